"""lsms: referring lesion segmentation with LSMS (Language-guided Scale-aware MedSegmentor, arXiv 2408.17347)."""

from lsms.model import LSMS, LSMSConfig, build, build_model, model_config

__version__ = "0.1.0"
__all__ = ["LSMS", "LSMSConfig", "build", "build_model", "model_config"]
