"""ProtoOT (AAAI 2024) unsupervised cross-domain retrieval as pytorch-metric-learning parts."""
from .ot import sinkhorn

__version__ = "0.1.0"

__all__ = ["sinkhorn"]
