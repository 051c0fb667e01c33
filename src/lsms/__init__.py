"""lsms: referring lesion segmentation with LSMS (Language-guided Scale-aware MedSegmentor, arXiv 2408.17347)."""

from lsms.model import LSMS, LSMSConfig, build_model, build_model_from_config

__version__ = "0.1.0"
__all__ = ["LSMS", "LSMSConfig", "build_model", "build_model_from_config"]
