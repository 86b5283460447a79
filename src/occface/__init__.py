"""occface: occlusion-aware face recognition (IR backbones, an occlusion head, weighted QAConv)."""
__version__ = "0.1.0"
