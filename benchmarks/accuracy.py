"""Cross-domain retrieval accuracy on pacs-mini: raw features, instance contrast and ProtoOT variants side by side.

CPU protocol: the offline ImageNet EfficientNet-Lite0 trunk is frozen and run
once (:class:`~pml_protoot.data.FeatureCache`: the eval view and ``--views`` MoCo-v2 views
of every image, normalised as timm's config of the weights says, cached under ``benchmarks/cache/``); only ProtoOT's MLP
head 1280 -> 1280 -> ReLU -> 128 trains, through the package's public API
(``ProtoOTTrainer`` with ``ProtoOTLoss`` or a PML loss + ``ProtoOTMiner``; scores from
``CrossDomainTester``, evaluating the momentum key encoder after the final epoch). Every
method sees the same cached features, the same sampler order and the same number of steps.

Training sets: the paper's domain pairs (each scored in both directions, 8 directions) and
all four domains jointly (12 directions). Metrics: ProtoOT's P@1/5/15/50 and full-ranking mAP.

    OMP_NUM_THREADS=1 python benchmarks/accuracy.py                 # full run, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --quick         # one pair, one seed
    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --holdout       # scored on images the heads never saw
    python benchmarks/accuracy.py --finetune --device cuda          # trunk trained end to end (GPU)

Each writes its published table under benchmarks/results/; a table that holds rows merged in later
(``--merge``) is not replaced by a command that would drop them (``--out`` elsewhere, or ``--force``).

``--finetune`` is the same protocol with the trunk unfrozen: no feature cache, every step
draws fresh MoCo-v2 views of the images (``--augment batched``, the default: images decoded
once, ``MoCoV2Augment`` on each batch on the device; ``--augment pil``: the PIL pipeline in
DataLoader workers, which left an H200 waiting on the CPU), the trunk and head train
together from the same ImageNet weights (one Adam over both, bf16 autocast on CUDA), and
the key encoder's trunk + head are scored on eval-view images. Domain centring needs
fixed trunk features, so no method centres end to end.

``--holdout`` asks whether a head carries over to images it was not trained on, as when a
collection is indexed after training: heads train on a fixed half of each (domain, class)'s
images (the same half for every method and seed) and are scored on the other half, centred
by the training half's domain means. Without it, as in the paper, heads train on every
image, without labels, and are scored on the same images.

Add a row (e.g. an ablation) by adding an entry to ``METHODS`` or ``ABLATIONS``: a function
``(domain_ids, epochs) -> Recipe``.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from functools import partial
from multiprocessing import get_all_start_methods, get_context, set_start_method
from pathlib import Path

import numpy as np
import timm
import torch
from pytorch_metric_learning.losses import MultiSimilarityLoss, NTXentLoss

from pml_protoot import (
    CachedTwoViewDataset,
    CrossDomainSampler,
    CrossDomainTester,
    FeatureCache,
    MoCoV2Augment,
    MultiDomainDataset,
    MultiDomainImageFolder,
    PrecisionAtKCalculator,
    PrototypeMemory,
    ProtoOTLoss,
    ProtoOTMiner,
    ProtoOTTrainer,
    TwoViewDataset,
    convert_efficientnet_lite0_weights,
    create_trunk,
    decode_transform,
    domain_means,
    embedding_head,
    eval_transform,
    moco_v2_transform,
    pca_init_,
    trunk_features,
)
from pml_protoot._files import check_creatable
from pml_protoot.augment import decoded_side

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    SMOKE_DIR,
    available_device,
    command_line,
    configure_logging,
    int_in,
    machine,
    markdown_table,
    pin_threads,
    write_json_and_markdown,
)

logger = logging.getLogger("benchmarks.accuracy")

BENCHMARKS = Path(__file__).resolve().parent
DATA = BENCHMARKS.parents[1] / "shared" / "data" / "pacs-mini"
CACHE_DIR = BENCHMARKS / "cache"
DEFAULT_OUT = BENCHMARKS / "results" / "accuracy_pacs_mini"
FINETUNE_OUT = BENCHMARKS / "results" / "accuracy_pacs_mini_finetune"
HOLDOUT_OUT = BENCHMARKS / "results" / "accuracy_pacs_mini_holdout"
SEED_RANGE = (0, 2**32 - 1)  # numpy's global seed, seeded with the others, takes no other value
HOLDOUT_SEED = 0  # the --holdout split's, the same for every run seed
AMP_OPTION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}

#: The paper's PACS pairs; each is trained once and scored in both directions.
PAIRS = (("photo", "art_painting"), ("photo", "cartoon"), ("photo", "sketch"), ("art_painting", "sketch"))
QUICK_PAIR = ("photo", "sketch")
JOINT = ("art_painting", "cartoon", "photo", "sketch")

BACKBONE, FEATURE_DIM, EMBEDDING_DIM = "tf_efficientnet_lite0", 1280, 128
#: Lite0's input normalisation from timm's pretrained config, as the CLI takes it: 0.5/0.5, the
#: TensorFlow weights' [-1, 1] scaling (ImageNet mean/std cost the weights' own classifier 5.7 points of
#: top-1 on pacs-mini photos: ``lite0_normalisation.py``). Results files record it; those without it used
#: ImageNet mean/std.
#: ``{"mean": [...], "std": [...]}``: the keyword arguments of the transforms.
NORMALISATION = {key: list(getattr(timm.models.get_pretrained_cfg(BACKBONE), key)) for key in ("mean", "std")}
BATCH_PER_DOMAIN = 64
LR, WEIGHT_DECAY = 2.5e-4, 5e-4
TEMPERATURE = 0.2  # InfoNCE's (MoCo v2's value)
PAPER_EPOCHS = 200  # the paper's schedule; cross-domain start is scaled from it
OFFICIAL_MOMENTUM, OFFICIAL_TEMPERATURE = 0.999, 0.2
K_VALUES = (1, 5, 15, 50)
METRICS = {f"P@{k}": f"precision_at_{k}" for k in K_VALUES} | {"mAP": "mean_average_precision"}


# ------------------------------------------------------------------------------ methods


@dataclass
class Recipe:
    """What one method trains with: memory, loss, optional miner and key-encoder momentum."""

    memory: PrototypeMemory
    loss: torch.nn.Module
    momentum: float
    mining_funcs: dict = field(default_factory=dict)
    center_domains: bool = False  # train and score on domain-centred trunk features (``domain_means``)
    pca_head: bool = False  # start the head at the features' principal components (``pca_init_``)


def package_default(function, name: str):
    """The default of ``function``'s argument ``name``, read from the code (the defaults evolve)."""
    return inspect.signature(function).parameters[name].default


def scaled_cross_domain_start(epochs: int) -> int:
    """The loss's default start epoch (100 of the paper's 200) scaled to ``epochs``."""
    return package_default(ProtoOTLoss, "cross_domain_start_epoch") * epochs // PAPER_EPOCHS


def num_classes_memory(domain_ids, **options) -> PrototypeMemory:
    """A memory with K = number of classes (7) unless ``num_prototypes`` is given."""
    options.setdefault("num_prototypes", 7)
    return PrototypeMemory(domain_ids, dim=EMBEDDING_DIM, **options)


def protoot(domain_ids, epochs, *, official=False, momentum=None, memory_options=None, loss_options=None,
            center_domains=None, pca_head=None, cross_domain_start_fraction=None):
    """ProtoOTLoss; ``official`` takes the official code's preset, tau and momentum, else the package defaults.

    The package's default pipeline trains on domain-centred features with a head started at their principal
    components; the official code does neither. The cross-domain term starts at the paper's point of the
    schedule, or at ``cross_domain_start_fraction`` of ``epochs`` when given.
    """
    memory = num_classes_memory(domain_ids, **(memory_options or {}))
    loss_options = ({"temperature": OFFICIAL_TEMPERATURE} if official else {}) | (loss_options or {})
    if cross_domain_start_fraction is None:
        start = scaled_cross_domain_start(epochs)
    else:
        start = int(cross_domain_start_fraction * epochs)
    loss = ProtoOTLoss(memory, cross_domain_start_epoch=start, official=official, **loss_options)
    if momentum is None:
        momentum = OFFICIAL_MOMENTUM if official else package_default(ProtoOTTrainer, "momentum")
    if center_domains is None:
        center_domains = not official
    if pca_head is None:
        pca_head = not official
    return Recipe(memory, loss, momentum, center_domains=center_domains, pca_head=pca_head)


def instance_contrast(domain_ids, epochs, *, momentum=None, center_domains=False):
    """InfoNCE between each query and its own key (in-batch negatives); the default momentum encoder
    and the raw (not centred) features unless told otherwise."""
    if momentum is None:
        momentum = package_default(ProtoOTTrainer, "momentum")
    return Recipe(num_classes_memory(domain_ids), NTXentLoss(TEMPERATURE), momentum, center_domains=center_domains)


def miner_with(loss_class, center_domains=True, pca_head=True, miner_options=None, **loss_options):
    """A recipe: ProtoOTMiner pseudo-label pairs with the PML loss ``loss_class(**loss_options)``.

    The package's default pipeline (domain-centred features, PCA-started head) unless told otherwise.
    """

    def recipe(domain_ids, epochs):
        memory = num_classes_memory(domain_ids)
        # no ProtoOTLoss moves the prototypes here
        miner = ProtoOTMiner(memory, update_prototypes=True, **(miner_options or {}))
        loss = loss_class(**loss_options)
        momentum = package_default(ProtoOTTrainer, "momentum")
        return Recipe(
            memory, loss, momentum, {"tuple_miner": miner}, center_domains=center_domains, pca_head=pca_head
        )

    return recipe


CENTRED_RAW = "raw features, domain-centred"
#: An approximate neighbour search far coarser than the defaults at scale: 1 of 8 lists probed, and a
#: buffer of 64 rows, so most rows written since the last K-means are searched through the index too.
COARSE_IVF = {"neighbour_search": "ivf", "ivf_nlist": 8, "ivf_nprobe": 1, "ivf_buffer_rows": 64}
#: name -> ``(domain_ids, epochs) -> Recipe``; None scores the frozen trunk's features untrained.
METHODS = {
    "raw features": None,
    "InfoNCE (NTXentLoss)": instance_contrast,
    "ProtoOT official": partial(protoot, official=True),
    "ProtoOT default": protoot,
    "ProtoOTMiner + NTXentLoss": miner_with(NTXentLoss, temperature=TEMPERATURE),
}
#: Extra rows, run only when named in ``--methods`` or with ``--ablation``.
ABLATIONS = {
    CENTRED_RAW: None,
    "ProtoOT default, not centred": partial(protoot, center_domains=False),
    "ProtoOT official, momentum 0.99": partial(protoot, official=True, momentum=0.99),
    "ProtoOT official, centred, momentum 0.99": partial(protoot, official=True, momentum=0.99, center_domains=True),
    "ProtoOT default, momentum 0.999": partial(protoot, momentum=0.999),
    "ProtoOT default, K = 14": partial(protoot, memory_options={"num_prototypes": 14}),
    "ProtoOT default, beta official": partial(protoot, memory_options={"marginal_rule": "official"}),
    "ProtoOT default, beta assignment": partial(protoot, memory_options={"marginal_rule": "assignment"}),
    "ProtoOT default, beta matched": partial(protoot, memory_options={"marginal_rule": "matched"}),
    "ProtoOT default, prototypes reset every epoch": partial(protoot, memory_options={"reset_prototypes": True}),
    "ProtoOT default, random head init": partial(protoot, pca_head=False),
    "ProtoOT default, row-normalised scores": partial(protoot, memory_options={"normalize_scores": True}),
    "ProtoOT default, epsilon 0.025": partial(protoot, memory_options={"epsilon": 0.025}),
    "ProtoOT default, epsilon 0.05 (the paper's)": partial(protoot, memory_options={"epsilon": 0.05}),
    "ProtoOT default, epsilon 0.2": partial(protoot, memory_options={"epsilon": 0.2}),
    "ProtoOT default, tau 0.1": partial(protoot, loss_options={"temperature": 0.1}),
    "ProtoOT default, tau 0.3": partial(protoot, loss_options={"temperature": 0.3}),
    "ProtoOT default, tau 0.4": partial(protoot, loss_options={"temperature": 0.4}),
    "ProtoOT default, tau 0.4, row-normalised scores": partial(
        protoot, loss_options={"temperature": 0.4}, memory_options={"normalize_scores": True}
    ),
    "ProtoOT default, no cross-domain term": partial(protoot, loss_options={"cross_domain_weight": 0.0}),
    "ProtoOT default, cross-domain weight 0.1": partial(protoot, loss_options={"cross_domain_weight": 0.1}),
    "ProtoOT default, cross-domain weight 1": partial(protoot, loss_options={"cross_domain_weight": 1.0}),
    "ProtoOT default, cross-domain from epoch 0": partial(protoot, cross_domain_start_fraction=0.0),
    "ProtoOT default, cross-domain from 3/4 of epochs": partial(protoot, cross_domain_start_fraction=0.75),
    # The settings that keep large banks cheap (README "Large banks"), at pacs-mini's size: 7-13 steps
    # an epoch, so 10 steps between full OTs is over an epoch of changed keys, harsher than at scale.
    "ProtoOT default, full OT every 10 steps": partial(protoot, memory_options={"refresh_every": 10}),
    "ProtoOT default, coarse IVF neighbours": partial(protoot, memory_options=COARSE_IVF),
    "ProtoOT default, full OT every 10 steps, coarse IVF neighbours": partial(
        protoot, memory_options={"refresh_every": 10, **COARSE_IVF}
    ),
    "InfoNCE (NTXentLoss), domain-centred": partial(instance_contrast, center_domains=True),
    "InfoNCE (NTXentLoss), momentum 0.999": partial(instance_contrast, momentum=OFFICIAL_MOMENTUM),
    "ProtoOTMiner + MultiSimilarityLoss": miner_with(MultiSimilarityLoss),
    "ProtoOTMiner (in-domain pairs) + NTXentLoss": miner_with(
        NTXentLoss, temperature=TEMPERATURE, miner_options={"cross_domain": False}
    ),
    "ProtoOTMiner (agreement positives) + MultiSimilarityLoss": miner_with(
        MultiSimilarityLoss, miner_options={"positives": "agreement"}
    ),
}
ALL_METHODS = METHODS | ABLATIONS


# ------------------------------------------------------------------------------ features


@dataclass
class Features:
    """Cached trunk features of the whole dataset, CPU tensors."""

    domains: list
    domain_ids: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)
    eval: torch.Tensor  # (N, F)
    views: torch.Tensor  # (V, N, F)
    trained: torch.Tensor | None = None  # (N,) bool: the images heads train on (--holdout); None: every image


def holdout_split(features: Features, seed: int = HOLDOUT_SEED) -> Features:
    """``features`` whose heads train on a random half (rounded down) of each (domain, class)'s images and are
    scored on the rest; the split depends on ``seed`` only."""
    generator = torch.Generator().manual_seed(seed)
    trained = torch.zeros(len(features.labels), dtype=torch.bool)
    groups = features.domain_ids * (int(features.labels.max()) + 1) + features.labels
    for group in groups.unique():
        members = torch.nonzero(groups == group).flatten()
        trained[members[torch.randperm(len(members), generator=generator)[: len(members) // 2]]] = True
    return replace(features, trained=trained)


def limit_per_domain(dataset: MultiDomainDataset, limit: int) -> MultiDomainDataset:
    """A copy of ``dataset`` with ``limit`` images per domain, evenly spaced (so every class stays)."""
    keep = []
    for domain in dataset.domains:
        indices = dataset.domain_indices(domain)
        spread = torch.linspace(0, len(indices) - 1, min(limit, len(indices))).round().long()
        keep += indices[spread].tolist()
    limited = copy.copy(dataset)
    MultiDomainDataset.__init__(
        limited, dataset.domains, dataset.classes, [dataset.samples[i] for i in keep], dataset.transform
    )
    return limited


def extract_features(data, cache_dir, views, image_size, limit, device) -> tuple[Features, float]:
    """Features of every image (from the cache file when it matches) and the seconds it took."""
    dataset = MultiDomainImageFolder(data_folder(data), JOINT)
    if limit:
        dataset = limit_per_domain(dataset, limit)
    trunk, feature_dim = create_trunk(BACKBONE, weights=convert_efficientnet_lite0_weights())
    assert feature_dim == FEATURE_DIM, feature_dim
    name = f"pacs_mini_lite0_{image_size}px_v{views}" + (f"_limit{limit}" if limit else "") + ".pt"
    start = time.perf_counter()
    cache = FeatureCache(
        dataset, trunk.to(device),
        train_view=moco_v2_transform(image_size, **NORMALISATION),
        eval_view=eval_transform(image_size, **NORMALISATION),
        num_views=views, path=Path(cache_dir) / name, batch_size=64, device=device, seed=0,
    )
    seconds = time.perf_counter() - start
    labels = torch.tensor(dataset.targets, dtype=torch.long)
    return Features(dataset.domains, dataset.domain_ids, labels, cache.eval_features, cache.view_features), seconds


# ------------------------------------------------------------------------------ one run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_tester(device, num_workers: int = 0) -> CrossDomainTester:
    calculator = PrecisionAtKCalculator(k_values=K_VALUES, include=list(METRICS.values()), device=device)
    return CrossDomainTester(calculator, batch_size=256, dataloader_num_workers=num_workers)


@dataclass
class FittedMethod:
    """One method trained on some domains, with the features it is scored on."""

    model: torch.nn.Module  # the trained head, or the identity for untrained features
    recipe: Recipe | None  # None for untrained features
    rows: torch.Tensor  # (N,) indices into ``Features`` of the scored images (with --holdout, the untrained half)
    eval_features: torch.Tensor  # (N, F) their eval features, domain-centred when the method centres
    labels: torch.Tensor  # (N,)
    domain_ids: torch.Tensor  # (N,) position of each image's domain in ``train_domains``
    training_s: dict  # :func:`timed_training`'s seconds; empty for untrained features


@dataclass
class Images:
    """pacs-mini as images, for ``--finetune``: the trunk trains end to end on fresh views."""

    root: Path
    limit: int | None  # images per domain (smoke tests)
    image_size: int
    workers: int  # DataLoader processes for training views and eval images
    amp_dtype: torch.dtype | None
    weights: dict  # the trunk's ImageNet state dict, converted once
    augment: str = "batched"  # MoCo-v2 views: "batched" on the device, or "pil" in DataLoader workers
    # Per train_domains, what every method and seed of a run shares: the decoded images and
    # the untrained trunk's eval-view features (the trunk always starts from ``weights``).
    _decoded: dict = field(default_factory=dict, repr=False)
    _untrained_features: dict = field(default_factory=dict, repr=False)

    def dataset(self, train_domains) -> MultiDomainDataset:
        """The images of ``train_domains``; ``domain_ids`` are positions in ``train_domains``."""
        dataset = MultiDomainImageFolder(self.root, train_domains)
        return limit_per_domain(dataset, self.limit) if self.limit else dataset

    def decoded(self, train_domains) -> "DecodedTwoViews":
        """:class:`DecodedTwoViews` of ``train_domains``'s images, decoded on the first call only."""
        key = tuple(train_domains)
        if key not in self._decoded:
            self._decoded[key] = DecodedTwoViews(self.dataset(train_domains), self.image_size)
        return self._decoded[key]

    def untrained_features(self, train_domains, trunk, eval_images) -> torch.Tensor:
        """``(N, F)`` features of the untrained ``trunk`` on ``eval_images`` (``pca_init_``'s input), extracted
        on the first call only."""
        key = tuple(train_domains)
        if key not in self._untrained_features:
            self._untrained_features[key] = trunk_features(
                trunk, eval_images, batch_size=256, num_workers=self.workers
            )
        return self._untrained_features[key]


class DecodedTwoViews(torch.utils.data.Dataset):
    """Item ``i`` is ``((image_i, image_i), i)``, ``image_i`` a ``(3, S, S)`` uint8 tensor decoded once:
    ``MoCoV2Augment`` turns each batch of them into views on the training device."""

    def __init__(self, dataset: MultiDomainDataset, image_size: int):
        decode = decode_transform(image_size)
        self.images = torch.stack([decode(dataset[i][0]) for i in range(len(dataset))])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return (self.images[index], self.images[index]), index


def fit_method(features: Features, train_domains, method: str, seed: int, epochs: int, device) -> FittedMethod:
    """Train ``method`` on ``train_domains`` (or not, for raw features): what :func:`run_method` scores.

    Trains on the images ``features.trained`` marks and scores the others (``--holdout``), or trains on and
    scores every image of ``train_domains`` when it is None.
    """
    slots = [features.domains.index(name) for name in train_domains]
    rows = torch.cat([torch.nonzero(features.domain_ids == slot).flatten() for slot in slots])
    domain_ids = torch.cat([torch.full((int((features.domain_ids == s).sum()),), i) for i, s in enumerate(slots)])
    trained = torch.ones(len(rows), dtype=torch.bool) if features.trained is None else features.trained[rows]
    scored = trained if features.trained is None else ~trained
    train_ids, eval_features, views = domain_ids[trained], features.eval[rows], features.views[:, rows[trained]]
    seed_everything(seed)
    build = ALL_METHODS[method]
    recipe = None if build is None else build(train_ids, epochs)
    if method == CENTRED_RAW or (recipe is not None and recipe.center_domains):
        means = domain_means(eval_features[trained], train_ids)  # the training images', as a user would have them
        eval_features, views = eval_features - means[domain_ids], views - means[train_ids]
    if recipe is None:
        model, training_s = torch.nn.Identity(), {}
    else:
        model, training_s = train_head(recipe, views, eval_features[trained], train_ids, seed, epochs, device)
    return FittedMethod(
        model.to(device), recipe, rows[scored], eval_features[scored], features.labels[rows[scored]],
        domain_ids[scored], training_s,
    )


def run_method(source: Features | Images, train_domains, method: str, seed: int, epochs: int, device) -> dict:
    """Train ``method`` on ``train_domains`` (or not, for raw features); score every direction among them."""
    start = time.perf_counter()
    if isinstance(source, Images):
        finetuned = finetune_method(source, train_domains, method, seed, epochs, device)
        recipe, training_s, fit_end = finetuned.recipe, finetuned.training_s, time.perf_counter()
        results = make_tester(device, source.workers).test(
            finetuned.eval_sets, epochs if recipe else 0, finetuned.trunk, finetuned.head
        )
    else:
        fitted = fit_method(source, train_domains, method, seed, epochs, device)
        recipe, domain_ids, training_s = fitted.recipe, fitted.domain_ids, fitted.training_s
        fit_end = time.perf_counter()
        eval_sets = {
            name: torch.utils.data.TensorDataset(fitted.eval_features[domain_ids == i], fitted.labels[domain_ids == i])
            for i, name in enumerate(train_domains)
        }
        results = make_tester(device).test(eval_sets, epochs if recipe else 0, fitted.model)
    end = time.perf_counter()
    setup_s = fit_end - start - sum(training_s.values())
    return {
        "method": method, "train_domains": list(train_domains), "seed": seed, "epochs": epochs if recipe else 0,
        "momentum": recipe.momentum if recipe else None, "pca_head": recipe.pca_head if recipe else None,
        "wall_time_s": round(end - start, 2),
        "phase_s": {"setup": round(setup_s, 2), **training_s, "score": round(end - fit_end, 2)},
        "directions": {
            direction: {short: values[metric] for short, metric in METRICS.items()}
            for direction, values in results.items() if direction != "mean"
        },
    }


def timed_training(trainer: ProtoOTTrainer, epochs: int) -> dict:
    """Train ``epochs`` epochs; return ``{"first_epoch": s, "later_epochs": s}``. The first epoch also fills
    the memory banks and pays each process's one-off device costs (e.g. CUDA kernel loading), which
    the per-epoch cost of longer schedules does not include."""
    epoch_ends = []
    trainer.end_of_epoch_hook = lambda _: epoch_ends.append(time.perf_counter())
    start = time.perf_counter()
    trainer.train(num_epochs=epochs)
    return {"first_epoch": round(epoch_ends[0] - start, 2), "later_epochs": round(epoch_ends[-1] - epoch_ends[0], 2)}


def train_head(recipe: Recipe, views, eval_features, domain_ids, seed, epochs, device) -> tuple[torch.nn.Module, dict]:
    """Train a fresh head on cached ``views`` ``(V, N, F)``; return the momentum key encoder's head and
    :func:`timed_training`'s seconds."""
    head = embedding_head(FEATURE_DIM, out_dim=EMBEDDING_DIM)
    if recipe.pca_head:
        pca_init_(head, eval_features)
    optimizer = torch.optim.Adam(head.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, amsgrad=True)
    batch_size = BATCH_PER_DOMAIN * int(domain_ids.max() + 1)
    trainer = ProtoOTTrainer(
        {"trunk": torch.nn.Identity(), "embedder": head.to(device)},
        {"embedder_optimizer": optimizer},
        batch_size,
        {"metric_loss": recipe.loss},
        CachedTwoViewDataset(views, domain_ids, seed=seed),
        recipe.memory,
        momentum=recipe.momentum,
        mining_funcs=recipe.mining_funcs,
        sampler=CrossDomainSampler(domain_ids, batch_size, seed=seed),
        fill_dataset=torch.utils.data.TensorDataset(eval_features, torch.arange(len(eval_features))),
        data_device=torch.device(device),
        dataloader_num_workers=0,
    )
    training_s = timed_training(trainer, epochs)
    return trainer.key_encoder.module[1], training_s  # Sequential(trunk, embedder): the trunk is the identity


@dataclass
class Finetuned:
    """The key encoder after training a trunk and a fresh head end to end, with what it is scored on."""

    recipe: Recipe | None  # None for untrained features
    eval_sets: dict  # {domain: eval-view images}
    trunk: torch.nn.Module
    head: torch.nn.Module | None  # None for untrained features
    training_s: dict  # :func:`timed_training`'s seconds; empty for untrained features


def finetune_method(images: Images, train_domains, method: str, seed: int, epochs: int, device) -> Finetuned:
    """Train the trunk and a fresh head end to end with ``method`` (or nothing, for raw features: the
    untrained trunk, no head)."""
    dataset = images.dataset(train_domains)
    seed_everything(seed)
    trunk, _ = create_trunk(BACKBONE, weights=images.weights)
    build = ALL_METHODS[method]
    recipe = None if build is None else build(dataset.domain_ids, epochs)
    eval_images = copy.copy(dataset)
    eval_images.transform = eval_transform(images.image_size, **NORMALISATION)
    eval_sets = {domain: eval_images.subset(domain) for domain in train_domains}
    if recipe is None:
        return Finetuned(None, eval_sets, trunk.to(device), None, {})
    head = embedding_head(FEATURE_DIM, out_dim=EMBEDDING_DIM)
    if recipe.pca_head:
        pca_init_(head, images.untrained_features(train_domains, trunk.to(device), eval_images))
    parameters = [*trunk.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=LR, weight_decay=WEIGHT_DECAY, amsgrad=True)
    batch_size = BATCH_PER_DOMAIN * len(train_domains)
    if images.augment == "batched":
        training_set = images.decoded(train_domains)
        batch_transform, loader_workers = MoCoV2Augment(images.image_size, **NORMALISATION).to(device), 0
    else:
        views = moco_v2_transform(images.image_size, **NORMALISATION)
        training_set, batch_transform, loader_workers = TwoViewDataset(dataset, views, views), None, images.workers
    trainer = ProtoOTTrainer(
        {"trunk": trunk.to(device), "embedder": head.to(device)},
        {"embedder_optimizer": optimizer},  # over trunk and head, as the CLI trains end to end
        batch_size,
        {"metric_loss": recipe.loss},
        training_set,
        recipe.memory,
        momentum=recipe.momentum,
        mining_funcs=recipe.mining_funcs,
        sampler=CrossDomainSampler(dataset.domain_ids, batch_size, seed=seed),
        fill_dataset=eval_images,
        batch_transform=batch_transform,
        amp_dtype=images.amp_dtype,
        data_device=torch.device(device),
        dataloader_num_workers=loader_workers,
    )
    training_s = timed_training(trainer, epochs)
    key_trunk, key_head = trainer.key_encoder.module
    return Finetuned(recipe, eval_sets, key_trunk, key_head, training_s)


def run_task(task, epochs, device) -> dict:
    """One method on one ``(train_domains, seed)``; in a worker process when ``--jobs > 1``."""
    train_domains, seed, method = task
    record = run_method(SOURCE, train_domains, method, seed, epochs, device)
    logger.info(
        "%s on %s, seed %d: mean P@15 %.1f (%.0f s: %s)", method, "+".join(train_domains), seed,
        100 * statistics.mean(v["P@15"] for v in record["directions"].values()), record["wall_time_s"],
        ", ".join(f"{phase} {seconds:.0f}" for phase, seconds in record["phase_s"].items()),
    )
    return record


def make_tasks(seeds, methods, train_sets) -> list[tuple]:
    """``(train_domains, seed, method)`` seed by seed, then method by method, so that a run cut short leaves
    whole seeds, and within one whole methods; the longest (joint) training first. Untrained features do
    not depend on the seed: they run with the first seed only."""
    return [
        (domains, seed, method)
        for seed in seeds
        for method in methods
        if ALL_METHODS[method] is not None or seed == seeds[0]
        for domains in train_sets
    ]


SOURCE: Features | Images | None = None  # set before the worker processes fork, which inherit it


# ------------------------------------------------------------------------------ report


def direction_names(train_domains) -> list[str]:
    return [f"{q}->{g}" for q in train_domains for g in train_domains if q != g]


def summarise(runs: list[dict], methods, train_sets, directions, metric: str) -> list[list[str]]:
    """Rows ``[method, mean±std per direction..., mean±std of the per-seed means]`` in percent.

    Only runs trained on one of ``train_sets`` count: a joint run also scores the pairs' directions.
    """
    rows = []
    for method in methods:
        per_seed = list(seed_values(runs, method, train_sets, directions, metric).values())
        if not per_seed:
            continue
        cells = [format_spread([values[d] for values in per_seed]) for d in directions]
        cells.append(format_spread([statistics.mean(values.values()) for values in per_seed]))
        rows.append([method, *cells])
    return rows


def seed_values(runs: list[dict], method: str, train_sets, directions, metric: str) -> dict[int, dict]:
    """``{seed: {direction: value}}`` for the seeds of ``method`` that scored every one of ``directions``
    in runs trained on one of ``train_sets``."""
    per_seed = {}
    for run in runs:
        if run["method"] == method and run["train_domains"] in train_sets:
            per_seed.setdefault(run["seed"], {}).update(
                {d: v[metric] for d, v in run["directions"].items() if d in directions}
            )
    return {seed: values for seed, values in per_seed.items() if len(values) == len(directions)}


def seed_spread(runs: list[dict], methods, train_sets, directions) -> list[list[str]]:
    """Rows ``[method, then per metric (P@15, mAP): mean and max of the per-direction std, std of the mean]``
    for methods with at least two seeds, in percent points."""
    rows = []
    for method in methods:
        cells = []
        for metric in ("P@15", "mAP"):
            per_seed = list(seed_values(runs, method, train_sets, directions, metric).values())
            if len(per_seed) < 2:
                break
            stds = [100 * statistics.stdev(values[d] for values in per_seed) for d in directions]
            mean_std = 100 * statistics.stdev(statistics.mean(values.values()) for values in per_seed)
            cells += [f"{statistics.mean(stds):.1f}", f"{max(stds):.1f}", f"{mean_std:.1f}"]
        if len(cells) == 6:
            rows.append([method, *cells])
    return rows


def counted_seeds_sentence(runs: list[dict], methods, train_sets, directions) -> str:
    """Which seeds the paired tables average per method: a cut-short table counts a seed only where the
    method finished every tabulated pair with it."""
    counted = {method: sorted(seed_values(runs, method, train_sets, directions, "P@15")) for method in methods}
    parts = [f"{method} {', '.join(map(str, seeds))}" for method, seeds in counted.items() if seeds]
    return ("Seeds in the paired tables (those that finished every tabulated pair; the other runs are in the "
            "JSON): " + "; ".join(parts) + "." if parts else "")


def format_spread(values) -> str:
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def augment_phrase(config: dict) -> str:
    if config.get("augment", "pil") == "pil":  # results written before --augment existed used PIL
        return "PIL augmentation in DataLoader workers"
    side = decoded_side(config["image_size"])
    return f"MoCoV2Augment on each batch on the device, images decoded once at {side} x {side}"


def normalisation_phrase(config: dict) -> str:
    normalisation = config.get("normalisation")  # absent from results written before it was recorded
    if normalisation is None:
        return "ImageNet mean/std"
    return f"mean {normalisation['mean']} / std {normalisation['std']}"


def protocol_sentence(config: dict) -> str:
    """How the trunk and the head were trained (the start of the markdown's protocol paragraph)."""
    if config.get("finetune"):
        return (
            f"Protocol: ImageNet EfficientNet-Lite0 trunk ({config['image_size']} px, {normalisation_phrase(config)}) "
            "and head "
            f"1280 -> 1280 -> ReLU -> 128 trained end to end on fresh MoCo-v2 views of the images ({augment_phrase(config)}; "
            f"autocast {config['amp']}; no domain centring, which needs a frozen trunk), "
        )
    return (
        f"Protocol: frozen ImageNet EfficientNet-Lite0 trunk ({config['image_size']} px, {normalisation_phrase(config)}), "
        "features "
        f"of the eval view and {config['views']} MoCo-v2 views cached once; head 1280 -> 1280 -> ReLU -> 128 trained "
    )


def phase_sentence(runs: list[dict], methods) -> str:
    """Median seconds of each phase of a run, per method."""
    timed = [run for run in runs if "phase_s" in run]
    parts = []
    for method in methods:
        phases = [run["phase_s"] for run in timed if run["method"] == method]
        if phases:
            medians = {name: statistics.median(p[name] for p in phases) for name in phases[0]}
            parts.append(f"{method}: " + ", ".join(f"{name.replace('_', ' ')} {s:.0f}" for name, s in medians.items()))
    return ("Median seconds per run by phase (setup is all before training; the first epoch includes filling "
            "the memory banks): " + "; ".join(parts) + ".\n")


def head_init_sentence(config: dict) -> str:
    """Which methods start the head at the features' principal components (older results did not record it)."""
    if "pca_head" not in config:
        return ""
    started = [method for method, pca in config["pca_head"].items() if pca]
    return "Head started at the training features' principal components (`pca_init_`): " + (
        ", ".join(started) if started else "none"
    ) + "; the others at random."


def tabulated_pairs(runs, methods, pairs) -> tuple[list, dict]:
    """``(pairs every method that ran has finished, {other pair: methods that finished it})``: a run cut
    short tabulates only pairs whose rows compare (every pair of the command when complete)."""
    ran = {(run["method"], tuple(run["train_domains"])) for run in runs}
    ran_methods = {method for method, _ in ran}
    methods = [method for method in methods if method in ran_methods]
    done = {tuple(pair): [m for m in methods if (m, tuple(pair)) in ran] for pair in pairs}
    tabulated = [pair for pair in pairs if len(done[tuple(pair)]) == len(methods)]
    unfinished = {pair: names for pair, names in done.items() if names and len(names) < len(methods)}
    return tabulated, unfinished


def markdown(payload: dict) -> str:
    config, runs = payload["config"], payload["runs"]
    methods = config["methods"]
    pairs, unfinished = tabulated_pairs(runs, methods, config["pairs"])
    pair_directions = [d for pair in pairs for d in direction_names(pair)]
    lines = [
        "# Cross-domain retrieval accuracy on pacs-mini\n",
        f"`{payload['command']}`\n",
        *([f"Merged from those commands by {', then '.join(f'`{m}`' for m in payload['merged_by'])}; the wall time "
           "is their sum.\n"] if "merged_by" in payload else []),
        f"Wall time {payload['wall_time_s'] / 60:.1f} min for training and scoring; feature extraction (or reading "
        f"its cache) {payload['feature_extraction_s']:.0f} s before that. "
        f"Machine: {payload['machine']}, torch threads {payload['threads']['torch_threads']}, "
        f"{config['jobs']} process(es).\n",
        protocol_sentence(config) +
        f"{config['epochs']} epochs (epoch = largest domain / {BATCH_PER_DOMAIN} steps, {BATCH_PER_DOMAIN} images of "
        f"every domain per step), Adam (amsgrad) lr {LR} wd {WEIGHT_DECAY}, tau {TEMPERATURE} (ProtoOT "
        f"default: the package's {package_default(ProtoOTLoss, 'temperature')}), K = 7, cross-domain "
        f"term from 0-based epoch {config['cross_domain_start']} (the paper's 100 of 200, scaled). "
        f"Seeds {sorted({run['seed'] for run in runs})}: "
        "mean ± std over seeds (raw features: seed-independent, one run). Scores of the momentum key encoder after "
        "the final epoch (no best-epoch selection). mAP is over the full ranking. Key-encoder momentum per method: "
        + ", ".join(f"{m} {v}" for m, v in config["momentum"].items() if v is not None) + ". "
        + head_init_sentence(config) + "\n",
    ]
    if setting(config, "holdout"):
        lines.append(
            "Held out: each head trained on a fixed half (rounded down) of every domain's images of each class "
            f"(split seed {HOLDOUT_SEED}, the same for every method and seed) and was scored on the other half only, "
            "which it never saw; centring used the training half's domain means. The scored sets are half the "
            "size of the main table's, so P@50 reaches further down each class.\n"
        )
    if any("phase_s" in run for run in runs):  # results written before phase_s existed have none
        lines.append(phase_sentence(runs, methods))
    if config.get("note"):
        lines.append(f"Note: {config['note']}\n")
    if not payload.get("complete", True):
        lines.append(f"**Partial results: the run was cut short after {len(runs)} runs.** "
                     + counted_seeds_sentence(runs, methods, pairs, pair_directions) + "\n")
    for pair, done in unfinished.items():
        lines.append(f"Left out of the tables, finished by only some methods: {'+'.join(pair)} ({', '.join(done)}; "
                     "their numbers are in the JSON).\n")
    for metric in METRICS:
        title = f"Domain pairs, {metric} (%)" + (" — main table" if metric == "P@15" else "")
        rows = summarise(runs, methods, pairs, pair_directions, metric)
        if rows:
            lines += [f"## {title}\n", markdown_table(["method", *pair_directions, "mean"], rows)]
    spread = seed_spread(runs, methods, pairs, pair_directions)
    if spread:
        lines += [
            f"## Seed spread over the {len(pair_directions)} paired directions\n",
            "Std over seeds per direction, then the mean (and max) of those over the directions; beside it the "
            f"std over seeds of the {len(pair_directions)}-direction mean, where directions' errors can cancel.\n",
            markdown_table(["method", "P@15: mean of std", "P@15: max std", "P@15: std of mean",
                            "mAP: mean of std", "mAP: max std", "mAP: std of mean"], spread),
        ]
    if config["joint"]:
        joint_directions = direction_names(JOINT)
        for metric in ("P@15", "mAP"):
            rows = summarise(runs, methods, [list(JOINT)], joint_directions, metric)
            if rows:
                lines += [f"## All four domains trained jointly, {metric} (%)\n",
                          markdown_table(["method", *joint_directions, "mean"], rows)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true",
        help=f"one pair ({'<->'.join(QUICK_PAIR)}, whatever --pairs says), the first of --seeds, no joint run",
    )
    parser.add_argument(
        "--seeds", type=int_in(*SEED_RANGE), nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)"
    )
    parser.add_argument(
        "--pairs", nargs="+", choices=["+".join(pair) for pair in PAIRS], default=["+".join(pair) for pair in PAIRS],
        help="the domain pairs to train (e.g. to finish a run cut short, then --merge)",
    )
    parser.add_argument("--epochs", type=int_in(1), default=60, help="training epochs of every run (default: 60)")
    parser.add_argument(
        "--methods", nargs="+", choices=list(ALL_METHODS), metavar="METHOD",
        help="rows to run, by name: the keys of METHODS and ABLATIONS in this script (default: METHODS; with "
        "--merge: every method of the files)",
    )
    parser.add_argument("--ablation", action="store_true", help="also run the ABLATIONS rows")
    parser.add_argument("--no-joint", action="store_true", help="skip the four-domain joint run")
    parser.add_argument(
        "--jobs", type=int_in(1), default=1,
        help="processes running (pair, seed, method) tasks side by side (one thread each; with --finetune they share the GPU)",
    )
    parser.add_argument("--views", type=int_in(2), default=4, help="augmented views cached per image (default: 4)")
    parser.add_argument("--image-size", type=int_in(1), default=224, help="side of the trunk's images (default: 224)")
    parser.add_argument("--limit-per-domain", type=int_in(1), help="use only N images per domain (smoke tests)")
    parser.add_argument("--data", default=str(DATA), help="the pacs-mini folder (default: ../shared/data/pacs-mini)")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR), help="feature cache folder (default: benchmarks/cache)")
    parser.add_argument("--device", type=available_device, default=torch.device("cpu"))
    parser.add_argument(
        "--finetune", action="store_true", help="train the trunk end to end on image views (no feature cache; GPU)"
    )
    parser.add_argument("--workers", type=int_in(0), default=8, help="--finetune: DataLoader processes")
    parser.add_argument(
        "--holdout", action="store_true",
        help="train the heads on a fixed half of each domain's images of each class, score them on the other half "
        "(frozen trunk only)",
    )
    parser.add_argument(
        "--augment", choices=["batched", "pil"], default="batched",
        help="--finetune: MoCo-v2 views by MoCoV2Augment on the device (images decoded once) or by PIL in workers",
    )
    parser.add_argument(
        "--amp", choices=list(AMP_OPTION_DTYPES), help="--finetune: autocast dtype (default bf16 on CUDA, none on CPU)"
    )
    parser.add_argument(
        "--out", type=out_prefix, help=f"output prefix: writes <out>.json and <out>.md (default {DEFAULT_OUT.name}, "
        f"{FINETUNE_OUT.name} with --finetune, {HOLDOUT_OUT.name} with --holdout, under benchmarks/results; under "
        "results/smoke/ with --quick "
        "or --limit-per-domain)"
    )
    parser.add_argument("--note", default="", help="a remark for the markdown (e.g. why the epoch count)")
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the runs already in <out>.json (same protocol) and run only the (pair, seed, method) tasks it "
        "lacks, e.g. to go on with a run cut short; <out> then holds both",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="replace <out>.json even when it holds runs this command does not make again, or runs of other settings "
        "(refused otherwise: the published tables are merged from several commands)",
    )
    parser.add_argument("--render", metavar="JSON", help="only rewrite the markdown beside this results JSON")
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON",
        help="only combine the --methods runs of these results JSONs (e.g. more seeds) into --out (needed)",
    )
    return parser


def out_prefix(text: str) -> Path:
    """``--out`` as a prefix: ``x``, ``x.json`` and ``x.md`` all mean ``x`` (``x.json.json`` otherwise)."""
    path = Path(text)
    return path.with_suffix("") if path.suffix in (".json", ".md") else path


def merged(payloads: list[dict], methods) -> dict:
    """One payload holding the runs of ``methods`` from every one of ``payloads`` (same protocol,
    e.g. other seeds, or a rerun of some rows: a later payload's run replaces an earlier one of the
    same method, training domains and seed); its command and machine list the sources', its wall time
    is their sum.

    Raises:
        SystemExit: the payloads were made with different protocols (see ``PROTOCOL``).
    """
    for payload in payloads[1:]:
        if differing := protocol_differences(payloads[0]["config"], payload["config"]):
            raise SystemExit(f"--merge: results made with other settings cannot be merged ({differing})")
    present = methods_present(payloads)
    config = dict(payloads[0]["config"])
    config["seeds"] = sorted({seed for p in payloads for seed in p["config"]["seeds"]})
    config["pairs"] = [list(pair) for pair in PAIRS if any(list(pair) in p["config"]["pairs"] for p in payloads)]
    config["methods"] = [m for m in methods if m in present]
    for setting in ("momentum", "pca_head"):
        if any(setting in p["config"] for p in payloads):  # results older than pca_head lack it
            config[setting] = {k: v for p in payloads for k, v in p["config"].get(setting, {}).items() if k in methods}
    config["joint"] = any(p["config"]["joint"] for p in payloads)
    return payloads[0] | {
        "command": " + ".join(p["command"] for p in payloads),
        "machine": " + ".join(dict.fromkeys(p["machine"] for p in payloads)),
        "wall_time_s": sum(p["wall_time_s"] for p in payloads),
        "complete": all(p.get("complete", True) for p in payloads),
        "config": config,
        "runs": list(latest_runs(payloads, methods).values()),
    }


def methods_present(payloads: list[dict]) -> set[str]:
    """The methods any of ``payloads`` ran."""
    return {method for payload in payloads for method in payload["config"]["methods"]}


def latest_runs(payloads: list[dict], methods) -> dict:
    """``{(method, train_domains, seed): run}`` of ``methods``, a later payload's run replacing an earlier one."""
    runs = {}
    for payload in payloads:
        for run in payload["runs"]:
            if run["method"] in methods:
                runs[(run["method"], tuple(run["train_domains"]), run["seed"])] = run
    return runs


#: Settings that change what a run measures: ``--resume`` only continues a file made with the same ones.
PROTOCOL = (
    "epochs", "finetune", "image_size", "views", "limit_per_domain", "amp", "augment", "cross_domain_start", "normalisation",
    "holdout",
)
#: What a setting recorded later means in results written before it.
PROTOCOL_ABSENT = {"holdout": False}


def resumed(out: Path, config: dict) -> dict | None:
    """The payload of ``<out>.json`` to go on from, or ``None`` when there is none yet.

    Raises:
        SystemExit: the file was made with another protocol (see ``PROTOCOL``).
    """
    path = out.with_name(out.name + ".json")
    if not path.exists():
        logger.info("--resume: no %s yet, running every task", path)
        return None
    previous = read_results(path, "--resume")
    if differing := protocol_differences(previous["config"], config):
        raise SystemExit(f"--resume: {path} was made with other settings ({differing}); pass them, or another --out")
    return previous


def read_results(path: Path, option: str) -> dict:
    """The payload of a results JSON this script wrote.

    Raises:
        SystemExit: naming ``option``, when the file cannot be read or is not such a payload.
    """
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SystemExit(f"{option}: cannot read {path} as a results JSON ({err})") from None
    if not (isinstance(payload, dict) and isinstance(payload.get("config"), dict) and isinstance(payload.get("runs"), list)):
        raise SystemExit(f"{option}: {path} is not a results JSON of this script (no config and runs)")
    return payload


def check_no_runs_dropped(out: Path, config: dict, runs: set) -> None:
    """Refuse to replace ``<out>.json`` when it holds runs other than ``runs`` ``(method, train_domains,
    seed)`` keys, or runs of another protocol: the published tables are merged from several commands,
    and a command that makes only some of their rows would silently drop the others.

    Raises:
        SystemExit: naming what would be lost and the options that keep or replace it.
    """
    path = out.with_name(out.name + ".json")
    if not path.exists():
        return
    previous = read_results(path, "--out")
    lost = sorted(set(latest_runs([previous], ALL_METHODS)) - runs, key=str)
    differing = protocol_differences(previous["config"], config)
    if lost or differing:
        what = (f"{len(lost)} run(s) this command does not make again, e.g. {lost[0]}" if lost
                else f"runs made with other settings ({differing})")
        raise SystemExit(f"--out: {path} holds {what}; pass --resume to add to it, another --out, or --force to replace it")


def check_not_merged(out: Path) -> None:
    """Refuse to run a command into a table merged from several (``--merge`` joins their commands with " + "),
    its own first command included: the table is rewritten after every run, so until the command ends (or
    for good, if it is cut) it holds a fraction of its rows, and the rows it remakes replace the others'.

    Raises:
        SystemExit: naming the options that keep or replace it.
    """
    path = out.with_name(out.name + ".json")
    if not path.exists():
        return
    previous = read_results(path, "--out")
    commands = str(previous.get("command", "")).count(" + ") + 1
    if commands > 1 or previous.get("merged_by"):
        raise SystemExit(f"--out: {path} was merged from {commands} commands; run this one into another --out and "
                         "--merge it in, pass --resume to add to it, or --force to replace it")


def protocol_differences(there: dict, here: dict) -> str:
    """The ``PROTOCOL`` settings in which two results' configs differ, as ``"key X there, Y here; ..."``
    (empty when none do)."""
    return "; ".join(
        f"{key} {setting(there, key)!r} there, {setting(here, key)!r} here"
        for key in PROTOCOL if setting(there, key) != setting(here, key)
    )


def setting(config: dict, key: str):
    """``config[key]``, or what its absence means (``PROTOCOL_ABSENT``; None for the others)."""
    return config.get(key, PROTOCOL_ABSENT.get(key))


def remaining(tasks: list[tuple], previous: dict | None) -> list[tuple]:
    """``tasks`` whose ``(method, train_domains, seed)`` has no run in ``previous``."""
    done = set(latest_runs([previous], ALL_METHODS)) if previous else set()
    return [(domains, seed, method) for domains, seed, method in tasks if (method, tuple(domains), seed) not in done]


def default_out(args) -> Path:
    """Where results go without ``--out``: the published files, or ``results/smoke/`` for ``--quick`` and
    ``--limit-per-domain`` runs, which must not replace them."""
    published = FINETUNE_OUT if args.finetune else HOLDOUT_OUT if args.holdout else DEFAULT_OUT
    return SMOKE_DIR / published.name if args.quick or args.limit_per_domain else published


def main(argv=None) -> dict:
    global SOURCE
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.render:
        payload = read_results(Path(args.render), "--render")
        Path(args.render).with_suffix(".md").write_text(markdown(payload))
        return payload
    if args.merge:
        return merge(args, parser)
    if args.holdout and args.finetune:
        parser.error("--holdout splits the cached features of a frozen trunk; it does not combine with --finetune")
    out = args.out or default_out(args)
    try:
        check_creatable("--out", out.with_name(out.name + ".json"), folder=False)
    except ValueError as err:
        parser.error(str(err))
    configure_logging()
    threads = pin_threads(1)
    pairs = [tuple(pair.split("+")) for pair in args.pairs]
    seeds, pairs = (args.seeds[:1], [QUICK_PAIR]) if args.quick else (args.seeds, pairs)
    joint = not (args.quick or args.no_joint)
    methods = list(dict.fromkeys((args.methods or list(METHODS)) + (list(ABLATIONS) if args.ablation else [])))
    if args.finetune:
        args.amp = args.amp or ("bf16" if args.device.type == "cuda" else "none")
    tasks = make_tasks(seeds, methods, ([JOINT] if joint else []) + pairs)
    config = {
        "epochs": args.epochs, "seeds": seeds, "pairs": [list(p) for p in pairs], "joint": joint,
        "methods": methods, "views": args.views, "image_size": args.image_size, "jobs": args.jobs,
        "limit_per_domain": args.limit_per_domain, "cross_domain_start": scaled_cross_domain_start(args.epochs),
        "note": args.note, "finetune": args.finetune, "amp": args.amp, "augment": args.augment if args.finetune else None,
        "normalisation": NORMALISATION, "holdout": args.holdout,
    }
    # Before the features: a refusal here costs seconds, not an extraction.
    previous = resumed(out, config) if args.resume else None
    # smoke results (git-ignored) are throwaway: only a table worth keeping is guarded
    if not (args.resume or args.force or out.resolve().is_relative_to(SMOKE_DIR.resolve())):
        check_no_runs_dropped(out, config, {(method, tuple(domains), seed) for domains, seed, method in tasks})
        check_not_merged(out)
    todo = remaining(tasks, previous)
    if previous:
        logger.info("--resume: %d of %d tasks already in %s.json", len(tasks) - len(todo), len(tasks), out)
        if not todo:
            return previous
        kept_methods = [m for m in ALL_METHODS if m in {*methods, *previous["config"]["methods"]}]
    if args.finetune:
        SOURCE, extraction_s = Images(
            data_folder(args.data), args.limit_per_domain, args.image_size, args.workers, AMP_OPTION_DTYPES[args.amp],
            convert_efficientnet_lite0_weights(), args.augment,
        ), 0.0
    else:
        SOURCE, extraction_s = extract_features(
            args.data, args.cache_dir, args.views, args.image_size, args.limit_per_domain, args.device
        )
        if args.holdout:
            SOURCE = holdout_split(SOURCE)
    start, runs = time.perf_counter(), []
    work = partial(run_task, epochs=args.epochs, device=args.device)
    for record in run_tasks(work, todo, args.jobs, start_method(SOURCE, args.device)):
        runs.append(record)
        payload = report(runs, config, extraction_s, time.perf_counter() - start, threads, args.device)
        if previous:
            payload = merged([previous, payload], kept_methods)
        payload["complete"] = len(runs) == len(todo)
        write_outputs(out, payload)  # after every run: a cut-short run still leaves its results
    logger.info("wrote %s.json and %s.md", out, out)
    return payload


def merge(args, parser) -> dict:
    """``--merge``: the runs of ``--methods`` (every method of the files without it) into ``--out``."""
    if args.out is None:
        parser.error("--merge needs --out (e.g. the first file's name, to add the others to it)")
    payloads = [read_results(Path(path), "--merge") for path in args.merge]
    present = methods_present(payloads)
    payload = merged(payloads, args.methods or [m for m in ALL_METHODS if m in present])
    if not payload["runs"]:
        raise SystemExit(f"--merge: the files hold no run of --methods {args.methods} (they hold {sorted(present)})")
    # every merge that made the sources, then this one
    payload["merged_by"] = [*(m for source in payloads for m in source.get("merged_by", [])), command_line()]
    if not args.force:
        check_no_runs_dropped(args.out, payload["config"], set(latest_runs([payload], ALL_METHODS)))
    write_outputs(args.out, payload)
    return payload


def data_folder(text: str) -> Path:
    """``--data`` as a folder, or a SystemExit naming it."""
    if not Path(text).is_dir():
        raise SystemExit(f"--data: {text} is not a folder (pacs-mini: <domain>/<class>/<image>)")
    return Path(text)


def start_method(source: Features | Images, device: torch.device) -> str:
    """How ``--jobs`` processes start: forked children share the cached features' memory, but a forked
    child cannot use CUDA once its parent has, so CUDA runs and ``--finetune`` (a GPU protocol) spawn."""
    return "fork" if isinstance(source, Features) and device.type == "cpu" else "spawn"


def run_tasks(work, tasks, jobs, start="fork"):
    """Yield ``work(task)`` as tasks finish; in ``jobs`` processes started by ``start`` when ``jobs > 1``.

    With ``--finetune --device cuda`` the processes share the GPU, which pays where one run's steps
    leave it idle (small batches, Python between kernels); it is not measured here.
    """
    if jobs == 1:
        yield from map(work, tasks)
        return
    context = get_context(start)
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=start_worker, initargs=(SOURCE, os.getpid())
    ) as pool:
        for future in as_completed([pool.submit(work, task) for task in tasks]):
            yield future.result()


def start_worker(source: Features | Images, parent_pid: int) -> None:
    """Set up a ``--jobs`` process as ``main`` set up itself (a spawned one inherits none of it), to end
    with its parent."""
    global SOURCE
    SOURCE = source
    configure_logging()
    pin_threads(1)
    fork_data_loader_workers()
    exit_when_orphaned(parent_pid)


def exit_when_orphaned(parent_pid: int, poll_s: float = 0.5) -> None:
    """End this process within ``poll_s`` seconds of ``parent_pid`` ceasing to be its parent.

    A parent killed by a signal sent to it alone (``kill``, ``timeout``, a batch system's SIGTERM) runs no
    cleanup, and its job processes would train their current runs to the end (minutes each) for results
    nobody collects. The parent id is passed in, not read here: a parent gone before the worker starts
    would otherwise be missed.
    """
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        logger.warning("job process %d: its parent %d has ended; stopping", os.getpid(), parent_pid)
        os._exit(1)  # a daemon thread cannot raise in the main thread, which may sit in a long torch call

    threading.Thread(target=watch, name="exit-when-orphaned", daemon=True).start()


def fork_data_loader_workers() -> None:
    """Make this process's DataLoaders fork their workers, as the parent's do.

    A spawned process inherits ``spawn`` as its default start method, and a DataLoader would then
    spawn its workers, each importing this script (torch, timm, faiss, ...) again: on an H200 with
    four such processes the first eval batch waited 22-28 s, at every DataLoader pass. Forking a
    process that uses CUDA is safe for workers that do not (decoding and transforms only).
    """
    if "fork" in get_all_start_methods():
        set_start_method("fork", force=True)


def report(runs, config, extraction_s, wall_time_s, threads, device) -> dict:
    order = {method: position for position, method in enumerate(config["methods"])}
    runs = sorted(
        runs, key=lambda run: (run["seed"], len(run["train_domains"]), run["train_domains"], order[run["method"]])
    )
    return {
        "command": command_line(),
        "wall_time_s": round(wall_time_s, 1),
        "feature_extraction_s": round(extraction_s, 1),
        "machine": machine(device),
        "threads": threads,
        "config": {
            **config,
            "momentum": {run["method"]: run["momentum"] for run in runs},
            "pca_head": {run["method"]: run["pca_head"] for run in runs},
        },
        "runs": runs,
    }


def write_outputs(out: Path, payload: dict) -> None:
    write_json_and_markdown(out, payload, markdown(payload))


if __name__ == "__main__":
    main()
