"""ProtoOT (AAAI 2024) unsupervised cross-domain retrieval as pytorch-metric-learning parts."""
from .accuracy import PrecisionAtKCalculator
from .augment import MoCoV2Augment, decode_transform
from .backbones import (
    convert_efficientnet_lite0_weights,
    create_trunk,
    embedding_head,
    fixed_input_size,
    load_trunk_weights,
    pca_init_,
)
from .data import (
    CachedTwoViewDataset,
    FeatureCache,
    InMemoryMultiDomainDataset,
    MultiDomainDataset,
    MultiDomainImageFolder,
    TwoViewDataset,
    domain_means,
    eval_transform,
    make_synthetic_domains,
    moco_v2_transform,
    trunk_features,
)
from .hooks import ProtoOTHookContainer
from .losses import ProtoOTLoss
from .memory import PrototypeMemory
from .miners import ProtoOTMiner
from .ot import sinkhorn
from .samplers import CrossDomainSampler
from .testers import CrossDomainTester
from .trainers import ProtoOTTrainer

__version__ = "0.1.0"

__all__ = [
    # ProtoOT as PML parts
    "sinkhorn",
    "PrototypeMemory",
    "ProtoOTLoss",
    "ProtoOTMiner",
    "CrossDomainSampler",
    "PrecisionAtKCalculator",
    "CrossDomainTester",
    "ProtoOTTrainer",
    "ProtoOTHookContainer",
    # data and backbones
    "MultiDomainDataset",
    "MultiDomainImageFolder",
    "InMemoryMultiDomainDataset",
    "TwoViewDataset",
    "CachedTwoViewDataset",
    "FeatureCache",
    "domain_means",
    "trunk_features",
    "make_synthetic_domains",
    "moco_v2_transform",
    "eval_transform",
    "MoCoV2Augment",
    "decode_transform",
    "create_trunk",
    "fixed_input_size",
    "load_trunk_weights",
    "convert_efficientnet_lite0_weights",
    "embedding_head",
    "pca_init_",
]
