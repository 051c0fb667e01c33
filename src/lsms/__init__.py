"""lsms: referring lesion segmentation with LSMS (Language-guided Scale-aware MedSegmentor, arXiv 2408.17347)."""

__version__ = "0.1.0"
