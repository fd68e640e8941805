"""ProtoOT training loop as a pytorch-metric-learning trainer: momentum keys, memory banks, reclustering."""
from __future__ import annotations

import copy
import logging
import math
import os
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.losses import CrossBatchMemory, SelfSupervisedLoss
from pytorch_metric_learning.trainers import BaseTrainer
from pytorch_metric_learning.utils import common_functions as c_f
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from ._checks import as_index_tensor, caller_stacklevel, check_non_negative_int, check_number, check_positive_int
from ._files import atomic_write, check_creatable, load_saved
from ._progress import progress_bar
from ._tensors import at_least_float32, model_device, unit_rows
from .data import TwoViewDataset, check_no_pil_images, first_item, item_layout
from .distributed import all_gather_objects, get_rank, get_world_size, is_distributed
from .losses import ProtoOTLoss
from .memory import PrototypeMemory
from .miners import ProtoOTMiner
from .samplers import CrossDomainSampler

# PML's ThresholdConsistentMarginLoss (2.7 and later) takes ref_emb but indexes its pairs into the
# queries, so the keys never reach it. () where PML lacks it: isinstance(x, ()) is False.
_IGNORES_REF_EMB = getattr(pml_losses, "ThresholdConsistentMarginLoss", ())

__all__ = ["ProtoOTTrainer"]

logger = logging.getLogger(__name__)

AMP_DTYPES = (None, torch.bfloat16, torch.float16)
TWO_VIEW_ITEMS = "dataset items must be ((query_view, key_view), global_index), e.g. from TwoViewDataset"
FILL_ITEMS = "fill_dataset items must be (eval_view, anything) with a tensor (or array) eval view"
CHECKPOINT_NAME = "last.pth"


class ProtoOTTrainer(BaseTrainer):
    r"""PML trainer for ProtoOT: query encoder, momentum key encoder, per-domain memory banks.

    Dataset items are ``((query_view, key_view), global_index)``
    (:class:`~pml_protoot.data.TwoViewDataset`): two augmentations of one sample and its
    index, which addresses the memory bank row. Class labels are never read: training is
    unsupervised, and the dataset need not carry them.

    Each iteration, with the query encoder :math:`f_q` = ``embedder(trunk(x))`` and the
    key encoder :math:`f_k` (an EMA copy of both):

    * :math:`q = f_q(x_q)` and :math:`k = \mathrm{normalise}(f_k(x_k))` without gradient;
    * with a :class:`~pml_protoot.losses.ProtoOTLoss`:
      ``loss(q, indices, ref_emb=k)`` (the loss writes :math:`k` into the memory);
      with any other PML loss: ``memory.fill(k, indices)``, then the optional
      ``mining_funcs["tuple_miner"](q, indices, k, indices)`` (e.g.
      :class:`~pml_protoot.miners.ProtoOTMiner`), then
      ``loss(q, indices, indices_tuple, ref_emb=k, ref_labels=indices)``; without a miner
      the only positive of :math:`q_i` is its own key, i.e. instance contrast (MoCo/InfoNCE);
    * optimizer steps, then the momentum update of every parameter *and* buffer
      :math:`\theta_k \leftarrow m\,\theta_k + (1 - m)\,\theta_q`
      (``timm.utils.ModelEmaV3``).

    BatchNorm for keys: :math:`f_k` always runs in eval mode, so BatchNorm normalises
    with its running statistics (themselves the EMA of the query encoder's running
    statistics). A key therefore never depends on the other samples of its batch: the
    intra-batch leak that MoCo's shuffled BatchNorm works around cannot occur, and keys
    written at bank filling and during training are computed the same way.

    Epochs are PML's (1-based). Before the first epoch, if any bank row is unwritten,
    the banks are filled with :math:`f_k` on ``fill_dataset`` (or on the training key
    views) with a progress bar. At the start of epoch ``e``: ``sampler.set_epoch(e)``
    when the sampler has it, a fresh data iterator, and ``memory.recluster(e - 1)`` (the
    memory counts epochs from 0, as the official code, so ``cross_domain_start_epoch=100``
    of the loss starts at PML epoch 101). The loss's cross-domain weight at that epoch is
    logged and kept in ``self.cross_domain_weight``.

    Many processes (``torchrun``, ``torch.distributed`` initialised before the trainer is
    built): the query encoder ``Sequential(trunk, embedder)`` is wrapped in
    ``DistributedDataParallel`` (unless ``trunk`` or ``embedder`` already is one), so
    gradients are averaged over ranks; the memory all-gathers every rank's keys, so
    banks and prototypes stay identical; the initial bank filling is split over ranks;
    only rank 0 writes checkpoints; models named in ``freeze_these`` are frozen before
    the wrapping (DDP must not wait for their gradients). Give each rank its shard with
    ``CrossDomainSampler(..., num_replicas=world_size, rank=rank)`` and ``batch_size``
    = the per-rank batch.

    Args:
        models: ``{"trunk": ..., "embedder": ...}`` (``embedder`` optional), as in PML.
        optimizers: ``{"trunk_optimizer": ..., "embedder_optimizer": ...}``, as in PML.
        batch_size: samples per batch; with a ``CrossDomainSampler``, a multiple of its
            ``batch_size`` (its domain-balanced blocks), or batches would not be balanced.
        loss_funcs: ``{"metric_loss": loss}``: a ``ProtoOTLoss`` on ``memory`` or any PML loss that
            takes ``ref_emb`` (the keys; one that refuses it, as PML's ``FastAPLoss``, ``HistogramLoss``,
            proxy losses, ``VICRegLoss`` and ``MultipleLosses`` do, is refused at construction by a call
            on 4 random vectors; so is ``ThresholdConsistentMarginLoss``, which ignores it). Not
            PML's ``SelfSupervisedLoss`` (the trainer already makes each query's key its
            positive: pass the loss it wraps) or ``CrossBatchMemory`` (it takes no ``ref_emb``; the
            trainer keeps no queue of negatives, the loss sees the batch's keys).
        dataset: items ``((query_view, key_view), global_index)``.
        memory: the :class:`~pml_protoot.memory.PrototypeMemory`; moved to ``data_device``.
        momentum: EMA momentum :math:`m` of the key encoder in ``[0, 1]`` (settable later).
            Default 0.99, not the paper's 0.999: the key encoder is what gets evaluated, and
            after ``s`` steps a fraction :math:`m^s` of it is still the initial weights
            (0.999 over the 210–390 steps of a 30-epoch pacs-mini pair run leaves 68–81%;
            measured there: the default pipeline's mean P@15 49.9 at 0.999 vs 59.7 at 0.99).
            Use 0.999 for the paper's 200-epoch schedules on large domains.
        mining_funcs: optional ``{"tuple_miner": miner}``, called with keys as reference; with a
            PML loss only (``ProtoOTLoss`` takes its targets from the memory, not from pairs).
        sampler: optional sampler (e.g. ``CrossDomainSampler``); ``set_epoch`` is called for you.
        fill_dataset: dataset whose item ``i`` is ``(eval_view_of_sample_i, anything)`` in
            global-index order, for the initial bank filling (default collation: ``collate_fn``
            and ``data_and_label_getter`` are for training items); ``None`` uses the key views
            of the training items.
        batch_transform: optional callable applied on ``data_device`` to each step's batch
            of query views and, separately, to its batch of key views, before the encoders
            (and to the key views of the bank filling when ``fill_dataset`` is ``None``):
            augmentation on the GPU, e.g. :class:`~pml_protoot.augment.MoCoV2Augment` with a
            dataset of decoded ``uint8`` images. Every call must draw its own random
            parameters; ``None`` uses the views as the dataset gives them.
        amp_dtype: ``None``, ``torch.bfloat16`` or ``torch.float16`` autocast for the
            forward passes (fp16 adds a gradient scaler); losses run in float32.
        grad_clip_norm: clip the gradient norm of trunk + embedder parameters jointly
            (after PML's own ``gradient_clippers``); ``None`` for no clipping.
        checkpoint_dir: if given, :meth:`save_checkpoint` writes ``last.pth`` there at
            the end of every epoch (rank 0 only; give it on every rank under
            ``torch.distributed`` so that every rank's random states are gathered into it). A
            folder that cannot be created or written is refused here, not after the first epoch.
        **pml_kwargs: any other ``BaseTrainer`` argument (``end_of_iteration_hook``,
            ``end_of_epoch_hook``, ``lr_schedulers``, ``data_device``, ``dataloader_num_workers``, ...);
            ``iterations_per_epoch``, steps an epoch, is a positive integer or ``None`` (one pass of
            the dataloader, as in PML, which also takes 0 for that).

    Raises:
        TypeError: ``memory`` is not a ``PrototypeMemory``, ``batch_transform`` is not callable,
            ``momentum`` or ``grad_clip_norm`` is not a number, ``batch_size`` or ``iterations_per_epoch``
            not an integer, or the first item of ``dataset`` or ``fill_dataset`` holds PIL images.
        ValueError: ``momentum``, ``grad_clip_norm`` or ``iterations_per_epoch`` out of range, a bad ``amp_dtype``,
            ``loss_funcs`` without ``"metric_loss"``, a ``ProtoOTLoss`` on another memory, a loss
            that refuses or ignores ``ref_emb``, a ``subset_batch_miner``, PML's label mapping
            (``set_min_label_to_zero``, ``dataset_labels``: the labels are sample indices), a
            ``fill_dataset`` whose length is not ``memory.num_samples`` (without one, a training
            ``dataset`` shorter than it), a ``fill_dataset`` whose ``domains`` are the training
            dataset's (or those of the dataset a ``TwoViewDataset`` wraps) in another order, or whose
            ``domain_ids`` split the samples otherwise than the memory, a ``CrossDomainSampler`` on
            other domains than the memory's, a ``checkpoint_dir`` that is a file, or a first item of
            ``dataset`` that is not ``((query_view, key_view), index)`` (unchecked with a ``collate_fn``
            or ``data_and_label_getter`` of your own) or of ``fill_dataset`` that is not ``(tensor, ...)``
            (a float tensor beside a ``batch_transform``: it does not transform fill views);
            at the first batch of the bank filling, models whose embeddings are not ``memory.dim`` wide.

    Warns:
        UserWarning: a ``ProtoOTMiner`` without ``update_prototypes`` on a memory without
            ``reset_prototypes``: nothing would move the prototypes from their first K-means centroids.

    Example:
        >>> import torch
        >>> from pml_protoot.losses import ProtoOTLoss
        >>> from pml_protoot.memory import PrototypeMemory
        >>> from pml_protoot.trainers import ProtoOTTrainer
        >>> _ = torch.manual_seed(0)
        >>> features, domains = torch.randn(16, 8), torch.tensor([0] * 8 + [1] * 8)
        >>> dataset = [((x + 0.1 * torch.randn(8), x), i) for i, x in enumerate(features)]
        >>> memory = PrototypeMemory(domains, dim=4, num_prototypes=2, kmeans_nredo=1)
        >>> trunk, embedder = torch.nn.Identity(), torch.nn.Linear(8, 4)
        >>> trainer = ProtoOTTrainer(
        ...     {"trunk": trunk, "embedder": embedder},
        ...     {"embedder_optimizer": torch.optim.SGD(embedder.parameters(), lr=0.1)},
        ...     batch_size=8, loss_funcs={"metric_loss": ProtoOTLoss(memory)}, dataset=dataset,
        ...     memory=memory, momentum=0.9, data_device=torch.device("cpu"), dataloader_num_workers=0,
        ... )
        >>> trainer.train(num_epochs=1)
        >>> bool(memory.written.all()), int(memory.epoch)
        (True, 0)
    """

    def __init__(
        self,
        models,
        optimizers,
        batch_size,
        loss_funcs,
        dataset,
        memory,
        *,
        momentum=0.99,
        mining_funcs=None,
        sampler=None,
        fill_dataset=None,
        batch_transform=None,
        amp_dtype=None,
        grad_clip_norm=None,
        checkpoint_dir=None,
        **pml_kwargs,
    ):
        if not isinstance(memory, PrototypeMemory):
            raise TypeError(f"memory must be a PrototypeMemory, got {type(memory).__name__}")
        if amp_dtype not in AMP_DTYPES:
            raise ValueError(f"amp_dtype must be one of {list(AMP_DTYPES)}, got {amp_dtype!r}")
        if batch_transform is not None and not callable(batch_transform):
            raise TypeError(f"batch_transform must be callable or None, got {type(batch_transform).__name__}")
        if grad_clip_norm is not None:
            grad_clip_norm = check_number("grad_clip_norm", grad_clip_norm, low=0, strict=True)
        check_positive_int("batch_size", batch_size)
        if pml_kwargs.get("iterations_per_epoch") is not None:  # PML would run range(-3), no step, without a word
            check_positive_int("iterations_per_epoch", pml_kwargs["iterations_per_epoch"])
        if not isinstance(loss_funcs, dict) or "metric_loss" not in loss_funcs:
            raise ValueError(f"loss_funcs must be a dict holding 'metric_loss' (the loss the trainer calls), "
                             f"got {loss_funcs!r}"[:300])
        if checkpoint_dir is not None:  # checked now, not at the first epoch's end
            check_creatable("checkpoint_dir", checkpoint_dir, folder=True)
        metric_loss = loss_funcs["metric_loss"]
        miner = mining_funcs.get("tuple_miner") if isinstance(mining_funcs, dict) else None
        _check_no_label_mapping(pml_kwargs)
        if isinstance(mining_funcs, dict) and "subset_batch_miner" in mining_funcs:
            raise ValueError(
                "mining_funcs['subset_batch_miner'] is not supported: a ProtoOTTrainer batch is two views of each "
                "sample, whose keys come from the momentum encoder; mine within the batch with "
                "mining_funcs['tuple_miner']"
            )
        _check_loss_and_miner(metric_loss, miner, memory)
        _check_fill_dataset_size(dataset, fill_dataset, memory)
        _check_fill_dataset_domains(dataset, fill_dataset, memory)
        _check_sampler_domains(sampler, memory)
        _check_sampler_shards(sampler)
        if isinstance(sampler, CrossDomainSampler) and batch_size % sampler.batch_size:
            raise ValueError(
                f"batch_size must be a multiple of the sampler's batch_size ({sampler.batch_size}), got {batch_size}: "
                "batches are cut from the sampler's domain-balanced blocks and would mix them unevenly"
            )
        self.memory = memory
        self.fill_dataset = fill_dataset
        self.batch_transform = batch_transform
        self.amp_dtype = amp_dtype
        self.grad_clip_norm = grad_clip_norm
        self.checkpoint_dir = checkpoint_dir
        self._initial_momentum = momentum
        self.cross_domain_weight = 0.0
        self._logged_cross_domain_weight = self._logged_checkpoint_path = None  # what the log said last
        self._rank_states = None  # every rank's random states, gathered at the end of an epoch
        super().__init__(
            models, optimizers, batch_size, loss_funcs, dataset, mining_funcs=mining_funcs, sampler=sampler, **pml_kwargs
        )

    # ----- setup -------------------------------------------------------------------------
    def custom_setup(self):
        """PML hook, run once PML has stored its arguments and before anything is built: refuse a
        dataset whose first item has the wrong layout (:func:`_check_first_items`). A ``collate_fn`` or
        ``data_and_label_getter`` of the user's own may take training items of another layout."""
        custom_items = self.collate_fn is not None or self.data_and_label_getter is not None
        _check_first_items(None if custom_items else self.dataset, self.fill_dataset, self.dataloader_num_workers,
                           self.batch_transform)

    def initialize_models(self):
        super().initialize_models()
        self.query_encoder = torch.nn.Sequential(self.models["trunk"], self.models["embedder"])
        self.key_encoder = ModelEmaV3(self.query_encoder, decay=0.0)
        self.key_encoder.requires_grad_(False)
        self.momentum = self._initial_momentum
        # DDP expects a gradient every step for each parameter that required one when it was
        # built. PML freezes freeze_these only in set_to_train (each epoch, after this), and
        # DDP then fails at the second step: freeze them first.
        for name in self.freeze_these:
            if name in self.models:
                c_f.set_requires_grad(self.models[name], requires_grad=False)
        already_wrapped = _check_wrapping(self.models)
        self.distributed_query_encoder = None
        if is_distributed() and not already_wrapped:
            self.distributed_query_encoder = DistributedDataParallel(self.query_encoder)
            logger.info("wrapped trunk + embedder in DistributedDataParallel (world size %d)", get_world_size())

    def compute_embeddings(self, data):
        """Query embeddings ``embedder(trunk(data))``, through DDP when it wraps the query encoder."""
        if self.distributed_query_encoder is None:
            return super().compute_embeddings(data)
        return self.distributed_query_encoder(c_f.to_device(data, device=self.data_device, dtype=self.dtype))

    def initialize_data_device(self):
        super().initialize_data_device()
        self.data_device = torch.device(self.data_device)  # PML also accepts a string such as "cuda"
        self.memory.to(self.data_device)
        self.grad_scaler = torch.amp.GradScaler(self.data_device.type, enabled=self.amp_dtype == torch.float16)

    @property
    def momentum(self) -> float:
        """EMA momentum :math:`m` of the key encoder; 1 freezes it, 0 copies the query encoder."""
        return self.key_encoder.decay

    @momentum.setter
    def momentum(self, value):
        self.key_encoder.decay = check_number("momentum", value, low=0, high=1)

    @property
    def protoot_modules(self) -> dict:
        """What ProtoOT trains beyond PML's trainer dicts, as a dict of modules for savers that take one
        (:class:`~pml_protoot.hooks.ProtoOTHookContainer`): ``{"key_encoder": ...}``, plus ``"memory"``
        when no loss or miner holds it (a ``ProtoOTLoss`` or ``ProtoOTMiner`` saves it with itself)."""
        holders = [*self.loss_funcs.values(), *self.mining_funcs.values()]
        held = any(getattr(holder, "memory", None) is self.memory for holder in holders)
        return {"key_encoder": self.key_encoder} if held else {"key_encoder": self.key_encoder, "memory": self.memory}

    # ----- epoch loop ----------------------------------------------------------------------
    def initialize_dataloader(self):
        """Build the training ``DataLoader``; its iterator is made per epoch in :meth:`start_epoch`.

        Unlike PML, no iterator is created here: creating one draws a seed from the torch
        RNG, and an extra draw on resume would break exact reproduction.
        """
        if isinstance(self.sampler, CrossDomainSampler):
            # Keep the last batch: it holds whole domain-balanced blocks, and dropping it (PML's
            # drop_last) would skip samples whenever batch_size is several sampler blocks.
            self.dataloader = torch.utils.data.DataLoader(
                self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                num_workers=self.dataloader_num_workers, collate_fn=self.collate_fn, drop_last=False,
            )
        else:
            self.dataloader = c_f.get_train_dataloader(
                self.dataset, self.batch_size, self.sampler, self.dataloader_num_workers, self.collate_fn
            )
        if not self.iterations_per_epoch:
            self.iterations_per_epoch = len(self.dataloader)

    def train(self, start_epoch=1, num_epochs=1):
        """Fill the banks if needed, then run epochs ``start_epoch..num_epochs`` (PML's loop).

        ``start_epoch`` is a positive integer, ``num_epochs`` a non-negative one; with ``start_epoch``
        past ``num_epochs`` (a finished run resumed) there is no epoch to run, which is logged as a warning.
        """
        start_epoch = check_positive_int("start_epoch", start_epoch)
        num_epochs = check_non_negative_int("num_epochs", num_epochs)
        if start_epoch > num_epochs:
            logger.warning("train(start_epoch=%d, num_epochs=%d): no epoch to run (a finished run resumed, or "
                           "num_epochs below start_epoch)", start_epoch, num_epochs)
        self.initialize_dataloader()
        gather_rank_states = self._every_rank_checkpoints()
        if not bool(self.memory.written.all()):
            self.fill_memory()
        for self.epoch in range(start_epoch, num_epochs + 1):
            self.start_epoch()
            progress = progress_bar(range(self.iterations_per_epoch), f"epoch {self.epoch}")
            loss_sum = 0.0
            for self.iteration in progress:
                self.forward_and_backward()
                self.end_of_iteration_hook(self)
                loss = float(torch.as_tensor(self.losses["total_loss"]).detach())
                loss_sum += loss
                progress.set_postfix(total_loss=loss)
                self.step_lr_schedulers(end_of_epoch=False)
            # The bar is hidden when stderr is not a terminal (a log file): the log keeps the loss.
            logger.info("epoch %d: mean total_loss %.5f over %d steps", self.epoch,
                        loss_sum / max(self.iterations_per_epoch, 1), self.iterations_per_epoch)
            self.step_lr_schedulers(end_of_epoch=True)
            self.zero_losses()
            # After the hook: a tester or a plateau scheduler in it draws random numbers and steps
            # state that a resumed run must start from.
            stop = self.end_of_epoch_hook(self) is False
            if gather_rank_states:
                self._gather_rank_states()
            if self.checkpoint_dir is not None and get_rank() == 0:
                self.save_checkpoint(os.path.join(self.checkpoint_dir, CHECKPOINT_NAME))
            if stop:
                break

    def start_epoch(self):
        """Train mode, sampler epoch, a fresh data iterator and reclustering for ``self.epoch``."""
        self.set_to_train()
        self._rank_states = None  # the previous epoch's, stale from now on
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        # A fresh iterator per epoch makes an epoch's batches depend only on state saved at
        # the previous epoch's end, which is what makes resuming exact.
        self.dataloader_iter = iter(self.dataloader)
        self.memory.recluster(self.epoch - 1)
        metric_loss = self.loss_funcs["metric_loss"]
        if isinstance(metric_loss, ProtoOTLoss):
            self.cross_domain_weight = metric_loss.current_cross_domain_weight()
        # One INFO line an epoch (its loss, in train); the weight only when it changes, e.g. the cross term's start.
        log = logger.info if self.cross_domain_weight != self._logged_cross_domain_weight else logger.debug
        log("epoch %d: memory epoch %d, cross-domain weight %g", self.epoch, self.epoch - 1, self.cross_domain_weight)
        self._logged_cross_domain_weight = self.cross_domain_weight

    @torch.no_grad()
    def fill_memory(self):
        """Write the key encoder's output for every sample into its bank row (progress bar).

        With several processes rank ``r`` embeds items ``r, r + W, ...``; ``memory.fill``
        all-gathers them, and ranks with fewer batches make empty calls to match.
        """
        dataset = self.dataset if self.fill_dataset is None else self.fill_dataset
        world_size, rank = get_world_size(), get_rank()
        positions = torch.arange(rank, len(dataset), world_size)
        shard = torch.utils.data.Subset(dataset, positions.tolist()) if world_size > 1 else dataset
        # collate_fn and data_and_label_getter are written for training items; fill_dataset's
        # items are (eval_view, anything), which the default collation handles.
        collate_fn = self.collate_fn if self.fill_dataset is None else None
        loader = c_f.get_eval_dataloader(shard, self.batch_size, self.dataloader_num_workers, collate_fn)
        start = 0
        for batch in progress_bar(loader, "filling memory banks"):
            if self.fill_dataset is None:
                (_, key_views), indices = self._split_batch(self.data_and_label_getter(batch))
                # As PML's get_batch does for the training batches (hierarchical labels: a column of them).
                indices = c_f.process_label(indices, self.label_hierarchy_level, self.label_mapper)
                key_views = self._transformed(key_views)
            else:
                key_views = _first_field(batch)
                indices = positions[start : start + len(key_views)]
                start += len(key_views)
            self.memory.fill(self._checked_width(self.compute_keys(key_views)), indices)
        most_batches = math.ceil(len(range(0, len(dataset), world_size)) / self.batch_size)  # rank 0's count
        for _ in range(most_batches - len(loader)):  # fill is a collective: every rank calls it equally often
            self.memory.fill(torch.zeros(0, self.memory.dim, device=self.data_device), torch.zeros(0, dtype=torch.long))
        logger.info("filled memory banks with %d keys", int(self.memory.written.sum()))

    def _checked_width(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys``, or a ValueError naming both widths when the models' output is not ``(B, memory.dim)``."""
        if keys.dim() != 2 or keys.shape[1] != self.memory.dim:
            raise ValueError(
                f"the models output embeddings of shape {tuple(keys.shape[1:])} a sample, the memory holds "
                f"rows of dim={self.memory.dim}: build PrototypeMemory(..., dim=) with the embedder's output width"
            )
        return keys

    # ----- one iteration ---------------------------------------------------------------------
    def calculate_loss(self, curr_batch):
        (query_views, key_views), indices = self._split_batch(curr_batch)
        query_views, key_views = self._transformed(query_views), self._transformed(key_views)
        with self._autocast():
            embeddings = self.compute_embeddings(query_views)
        keys = self.compute_keys(key_views)
        indices = c_f.to_device(torch.as_tensor(indices), device=self.data_device)
        # autocast's half-precision outputs in float32; a float64 model's stay float64, as its keys do
        self.losses["metric_loss"] = self.maybe_get_metric_loss(at_least_float32(embeddings), indices, keys)

    def maybe_get_metric_loss(self, embeddings, indices, keys):
        if self.loss_weights.get("metric_loss", 0) <= 0:
            return 0
        loss_func = self.loss_funcs["metric_loss"]
        if isinstance(loss_func, ProtoOTLoss):
            return loss_func(embeddings, indices, ref_emb=keys)
        self.memory.fill(keys, indices)
        # A copy: PML losses and miners take ``ref_labels is labels`` for "the references are the
        # embeddings" and drop the diagonal pairs, which here are each query's own key, the positives.
        key_indices = indices.clone()
        indices_tuple = self.maybe_mine_embeddings(embeddings, indices, keys, key_indices)
        return loss_func(embeddings, indices, indices_tuple, ref_emb=keys, ref_labels=key_indices)

    def maybe_mine_embeddings(self, embeddings, labels, ref_emb=None, ref_labels=None):
        if "tuple_miner" in self.mining_funcs:
            return self.mining_funcs["tuple_miner"](embeddings, labels, ref_emb, ref_labels)
        return None

    @torch.no_grad()
    def compute_keys(self, data):
        """L2-normalised ``(B, dim)`` keys of the EMA encoder in eval mode (see BatchNorm above), in
        float32 (float64 from a float64 key encoder)."""
        self.key_encoder.eval()
        data = c_f.to_device(data, device=self.data_device, dtype=self.dtype)
        with self._autocast():
            keys = self.key_encoder.module(data)
        return unit_rows(keys)

    @torch.no_grad()
    def _transformed(self, views):
        """``batch_transform(views)`` on ``data_device``, or ``views`` unchanged without one."""
        if self.batch_transform is None:
            return views
        return self.batch_transform(c_f.to_device(views, device=self.data_device))

    def _autocast(self):
        return torch.autocast(self.data_device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    @staticmethod
    def _split_batch(batch):
        try:
            (query_views, key_views), indices = batch
        except (TypeError, ValueError) as err:
            raise ValueError(f"{TWO_VIEW_ITEMS}; got a batch that collates to {item_layout(batch)}") from err
        return (query_views, key_views), indices

    def backward(self):
        self.grad_scaler.scale(self.losses["total_loss"]).backward()

    def clip_gradients(self):
        for optimizer in self.optimizers.values():
            self.grad_scaler.unscale_(optimizer)  # no-op unless fp16: clip true gradients
        super().clip_gradients()
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.query_encoder.parameters(), self.grad_clip_norm)

    def step_optimizers(self):
        for name, optimizer in self.optimizers.items():
            if c_f.regex_replace("_optimizer$", "", name) not in self.freeze_these:
                self.grad_scaler.step(optimizer)
        self.grad_scaler.update()
        self.key_encoder.update(self.query_encoder)

    # ----- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, path):
        """Atomically write everything needed to resume after ``self.epoch`` to ``path``.

        The state is written to a temporary file in the same folder, flushed, and moved
        onto ``path`` with ``os.replace``: ``path`` holds either the previous checkpoint or
        the new one, never a partial file; on failure the temporary file is removed.
        """
        state = self.checkpoint_state()
        with atomic_write(path) as file:
            torch.save(state, file)
        log = logger.debug if self._logged_checkpoint_path == path else logger.info  # the first save of a run says where
        log("saved checkpoint of epoch %d to %s", self.epoch, path)
        self._logged_checkpoint_path = path

    def checkpoint_state(self) -> dict:
        """Models, key encoder, memory, losses, optimizers, schedulers, scaler, sampler and dataset
        states (where they have ``state_dict``), epoch, RNG; under ``torch.distributed``, after the
        epoch loop's gathering, also every rank's RNG and dataset states (``"rank_states"``)."""
        return {
            "epoch": self.epoch,
            "momentum": self.momentum,
            "models": _state_dicts(self.models),
            "key_encoder": self.key_encoder.state_dict(),
            "memory": self.memory.state_dict(),
            "loss_funcs": _state_dicts(self.loss_funcs),
            "optimizers": _state_dicts(self.optimizers),
            "lr_schedulers": _state_dicts(self.lr_schedulers),
            "grad_scaler": self.grad_scaler.state_dict(),
            "sampler": _state_or_none(self.sampler),
            **self._rank_state(),
            "rank_states": self._rank_states,
        }

    def _rank_state(self) -> dict:
        """This process's own random state: RNGs, the bfloat16 EMA rounding generator, the dataset's draws."""
        return {
            "dataset": _state_or_none(self.dataset),
            "rng": _rng_state(),
            "key_encoder_rounding_rng": _rounding_generator_state(self.key_encoder),
        }

    def _every_rank_checkpoints(self) -> bool:
        """Whether every rank has a ``checkpoint_dir``, so that the epoch-end gathering of random states
        is a collective all of them join (a collective itself under ``torch.distributed``)."""
        if not is_distributed():
            return False
        has_folder = all_gather_objects(self.checkpoint_dir is not None)
        if any(has_folder) and not all(has_folder) and get_rank() == 0:
            logger.warning("checkpoint_dir is set on some ranks only: checkpoints hold rank 0's random states only, "
                           "and a resume is exact only if all ranks were seeded alike; pass it on every rank (only "
                           "rank 0 writes)")
        return all(has_folder)

    def _gather_rank_states(self) -> None:
        """Keep every rank's :meth:`_rank_state` for rank 0's checkpoint of this epoch (a collective
        under ``torch.distributed``: ``save_checkpoint`` runs on rank 0 only, so it cannot gather)."""
        self._rank_states = all_gather_objects(self._rank_state())

    def _saved_rank_state(self, state: dict) -> dict:
        """This rank's entry of ``state["rank_states"]``, or the top-level (rank 0's) states."""
        rank_states, world_size = state.get("rank_states"), get_world_size()
        if rank_states is None:
            if world_size > 1:
                logger.warning("checkpoint holds rank 0's random states only (written by a save_checkpoint call "
                               "outside the checkpoint_dir saves, or by an earlier pml_protoot): every rank resumes "
                               "from them, exactly only if all ranks were seeded alike")
            return state
        if len(rank_states) != world_size:
            logger.warning("checkpoint saved by %d processes, resumed by %d: every rank resumes from rank 0's "
                           "random states", len(rank_states), world_size)
            return state
        return rank_states[get_rank()]

    def load_checkpoint(self, path) -> int:
        """Restore a :meth:`save_checkpoint` file; return the epoch to pass to ``train`` as ``start_epoch``.

        Under ``torch.distributed`` each rank restores its own RNG and dataset states, which the
        ``checkpoint_dir`` saves gather from every rank when every rank has a ``checkpoint_dir``.
        A checkpoint holding rank 0's states only (``checkpoint_dir`` on some ranks only, or a
        ``save_checkpoint`` call of your own), or written by another number of processes, gives
        every rank rank 0's states, with a warning.

        Raises:
            FileNotFoundError: no file at ``path``.
            KeyError: the file lacks a model, loss, optimizer or scheduler of this trainer.
            ValueError: a file ``torch.save`` did not write (torch's own error is pages of advice on
                ``weights_only``) or one ``save_checkpoint`` did not write, or its sampler or dataset
                state does not fit this trainer's (both refused before anything is restored).
            RuntimeError: a state dict does not fit its module (shapes, keys).
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} is not a file")
        state = load_saved(path, "checkpoint")
        self._check_checkpoint_fits(state, path)
        for group in ("models", "loss_funcs", "optimizers", "lr_schedulers"):
            for name, module in getattr(self, group).items():
                module.load_state_dict(state[group][name])
        self.key_encoder.load_state_dict(state["key_encoder"])
        self.memory.load_state_dict(state["memory"])
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        if state["sampler"] is not None:
            self.sampler.load_state_dict(state["sampler"])
        self.momentum = state["momentum"]
        self.epoch = state["epoch"]
        own = self._saved_rank_state(state)
        if own.get("dataset") is not None:  # "dataset" is absent from older checkpoints
            self.dataset.load_state_dict(own["dataset"])
        _set_rng_state(own["rng"])
        _set_rounding_generator_state(self.key_encoder, own.get("key_encoder_rounding_rng"))
        logger.info("resumed from %s after epoch %d", path, self.epoch)
        return self.epoch + 1

    def _check_checkpoint_fits(self, state: dict, path) -> None:
        if not isinstance(state, dict) or "key_encoder" not in state:
            raise ValueError(f"checkpoint {os.fspath(path)!r} is not a ProtoOTTrainer checkpoint (save_checkpoint "
                             f"writes one): it holds a {type(state).__name__}"
                             + (f" of keys {sorted(state)[:8]}" if isinstance(state, dict) else ""))
        for group in ("models", "loss_funcs", "optimizers", "lr_schedulers"):
            missing = sorted(set(getattr(self, group)) - set(state.get(group, {})))
            if missing:
                raise KeyError(f"checkpoint {os.fspath(path)!r} holds no {group} {missing} (it has "
                               f"{sorted(state.get(group, {}))}): it was saved by a trainer of another setup")
        for name in ("sampler", "dataset"):
            saved, expected = state.get(name) is not None, hasattr(getattr(self, name), "state_dict")
            # Checkpoints made before datasets had a state lack the "dataset" entry; they still resume.
            if saved != expected and name in state:
                raise ValueError(
                    f"checkpoint {os.fspath(path)!r} {'holds' if saved else 'lacks'} a {name} state but this "
                    f"trainer's {name} ({type(getattr(self, name)).__name__}) {'has none' if saved else 'has one'}: "
                    f"build the trainer with the {name} the checkpoint was trained with"
                )


def _check_no_label_mapping(pml_kwargs: dict) -> None:
    """Refuse PML's label remapping: the "labels" a ProtoOTTrainer batch carries are sample indices."""
    for name, given in (("set_min_label_to_zero", bool(pml_kwargs.get("set_min_label_to_zero"))),
                        ("dataset_labels", pml_kwargs.get("dataset_labels") is not None)):
        if given:
            raise ValueError(
                f"{name} is not supported: ProtoOTTrainer's labels are global sample indices (they address the "
                "memory bank rows), which PML's label mapping would remap; class labels are never read in training"
            )


def _check_wrapping(models: dict) -> bool:
    """Whether the user wrapped the models in DistributedDataParallel: all trained ones, or none.

    Raises:
        ValueError: some trained models wrapped and others not (their gradients would not be averaged).
    """
    trained = {name: model for name, model in models.items() if any(p.requires_grad for p in model.parameters())}
    wrapped = sorted(name for name, model in trained.items() if isinstance(model, DistributedDataParallel))
    if wrapped and len(wrapped) < len(trained):
        raise ValueError(
            f"models {wrapped} are wrapped in DistributedDataParallel but {sorted(set(trained) - set(wrapped))} "
            "are not, whose gradients would never be averaged over ranks: wrap every trained model, or none "
            "(under torch.distributed the trainer wraps trunk and embedder together)"
        )
    return bool(wrapped)


def _first_field(batch):
    """The eval views of a batch of ``fill_dataset`` items ``(eval_view, anything)``, or a ValueError."""
    if not isinstance(batch, (tuple, list)) or not batch or not isinstance(batch[0], torch.Tensor):
        raise ValueError(f"{FILL_ITEMS}, got items that collate to {item_layout(batch)}")
    return batch[0]


def _check_first_items(dataset, fill_dataset, num_workers: int, batch_transform=None) -> None:
    """Refuse a training (unless None) or bank-filling dataset whose first item has the wrong layout now, not
    after the bank-filling pass and K-means (a ``MetricLossOnly`` dataset of ``(image, class_label)`` items is
    the usual slip), and integer fill views beside a ``batch_transform`` (built like its decoded training
    images, they reach the models untransformed). The items are read as the trainer's loaders read them
    (:func:`~pml_protoot.data.first_item`)."""
    item = first_item(dataset, num_workers) if dataset is not None else None
    if item is not None and not _is_two_view_item(item):
        hint = (": (image, class_label) items, as MetricLossOnly takes, go through TwoViewDataset(images, views, "
                "views), whose labels are the sample indices") if _is_image_and_label(item) else ""
        raise ValueError(f"{TWO_VIEW_ITEMS}; dataset[0] is {item_layout(item)}{hint}")
    for view in item[0] if item is not None else ():
        check_no_pil_images("dataset views", view, "give TwoViewDataset views that make tensors, e.g. "
                            "moco_v2_transform(...)")
    item = first_item(fill_dataset, num_workers) if fill_dataset is not None else None
    if item is None:
        return
    check_no_pil_images("fill_dataset items", item)
    if not isinstance(item, (tuple, list)) or not item or not isinstance(item[0], (torch.Tensor, np.ndarray)):
        raise ValueError(f"{FILL_ITEMS}; fill_dataset[0] is {item_layout(item)}")
    if batch_transform is not None and not torch.as_tensor(item[0]).is_floating_point():
        raise ValueError(
            f"fill_dataset[0]'s eval view is of dtype {item[0].dtype}: fill_dataset views reach the models as they "
            "are, not through batch_transform; give normalised float eval views, e.g. eval_transform(size, mean, std)"
        )


def _is_two_view_item(item) -> bool:
    """Whether ``item`` is ``((query_view, key_view), index)``."""
    return (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (tuple, list))
            and len(item[0]) == 2 and _is_index(item[1]))


def _is_image_and_label(item) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and not isinstance(item[0], (tuple, list))


def _is_index(value) -> bool:
    """Whether ``value`` is an integer sample index, or a row of them (PML's ``label_hierarchy_level``
    picks one column)."""
    if isinstance(value, torch.Tensor):
        return (value.ndim <= 1 and not value.is_floating_point() and not value.is_complex()
                and value.dtype != torch.bool)
    if isinstance(value, np.ndarray):
        return value.ndim <= 1 and np.issubdtype(value.dtype, np.integer)
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_fill_dataset_size(dataset, fill_dataset, memory) -> None:
    """Refuse a ``fill_dataset`` (item ``i`` is sample ``i``) whose length is not the memory's sample count,
    or, without one, a training ``dataset`` shorter than it: rows would stay unwritten, found only after the
    bank-filling pass. A longer training set is fine (a ``ConcatDataset`` of two passes)."""
    if fill_dataset is not None and hasattr(fill_dataset, "__len__") and len(fill_dataset) != memory.num_samples:
        raise ValueError(f"fill_dataset must hold one item per memory sample ({memory.num_samples}), "
                         f"got {len(fill_dataset)}")
    if fill_dataset is None and hasattr(dataset, "__len__") and len(dataset) < memory.num_samples:
        raise ValueError(f"dataset fills the banks (no fill_dataset given), so it must hold every memory sample "
                         f"({memory.num_samples}), got {len(dataset)} items; pass fill_dataset for a partial one")


def _check_sampler_domains(sampler, memory) -> None:
    """Refuse a CrossDomainSampler built on other domains than the memory: its batches would not be
    balanced over the memory's domains, silently."""
    if not isinstance(sampler, CrossDomainSampler):
        return
    domain_ids = torch.empty(sum(len(indices) for indices in sampler.domain_indices), dtype=torch.long)
    for slot, indices in enumerate(sampler.domain_indices):
        domain_ids[indices] = slot
    difference = _domain_split_difference(domain_ids, memory, "the sampler's domains")
    if difference is not None:
        raise ValueError(
            "sampler must be built on the memory's domains (CrossDomainSampler(domain_ids, ...) with the "
            f"domain_ids of PrototypeMemory): {difference}"
        )


def _check_fill_dataset_domains(dataset, fill_dataset, memory) -> None:
    """Refuse a ``fill_dataset`` that lists the samples in another domain order than the training ``dataset``
    or the memory: the banks would start from another domain's images, silently (item ``i`` of both is
    sample ``i``). Datasets that expose neither ``domains`` nor ``domain_ids`` are not checked."""
    if fill_dataset is None:
        return
    fill_domains, fill_domain_ids = _domain_layout(fill_dataset)
    train_domains, _ = _domain_layout(dataset)
    # The same names in another order; other names (say, capitalised) are left to the domain_ids check.
    if (fill_domains is not None and train_domains is not None and list(fill_domains) != list(train_domains)
            and sorted(fill_domains) == sorted(train_domains)):
        raise ValueError(
            "fill_dataset must list the samples in the training dataset's order (item i of both is sample i): "
            f"its domains are {list(fill_domains)}, the dataset's {list(train_domains)}; build both with the same "
            "domains, in the same order"
        )
    if fill_domain_ids is None:
        return
    fill_domain_ids = as_index_tensor("fill_dataset.domain_ids", fill_domain_ids)
    difference = _domain_split_difference(fill_domain_ids, memory, "its domain_ids")
    if difference is not None:
        raise ValueError(f"fill_dataset must list the samples in the memory's order (item i is sample i): {difference}")


def _domain_layout(dataset) -> tuple:
    """``(domains, domain_ids)`` of a dataset or of the dataset a :class:`TwoViewDataset` wraps; None where
    it exposes none."""
    source = dataset.dataset if isinstance(dataset, TwoViewDataset) else dataset
    return getattr(source, "domains", None), getattr(dataset, "domain_ids", getattr(source, "domain_ids", None))


def _domain_split_difference(domain_ids: torch.Tensor, memory, subject: str) -> str | None:
    """None when ``(N,)`` ``domain_ids`` split the samples into the memory's domains, whatever id each domain
    has; else a clause on ``subject`` naming the first sample whose domain is not matched one to one."""
    ours = torch.unique(domain_ids.cpu(), return_inverse=True)[1]
    theirs = memory.domain_of.cpu()
    if len(ours) != len(theirs):
        return f"{subject} cover {len(ours)} samples, the memory's {len(theirs)}"
    pairs = ours * memory.num_domains + theirs
    # Sample i's two domains match one to one when every sample of either is in the other.
    ours_size, theirs_size, shared = (torch.bincount(ids)[ids] for ids in (ours, theirs, pairs))
    parted = torch.nonzero((shared != ours_size) | (shared != theirs_size)).flatten()
    if len(parted) == 0:
        return None
    first = int(parted[0])
    return (f"{subject} split the samples otherwise than the memory's: sample {first} is in a domain of "
            f"{int(ours_size[first])} samples there, of {int(theirs_size[first])} in the memory, "
            f"{int(shared[first])} of them in both")


def _check_sampler_shards(sampler) -> None:
    """Under torch.distributed, refuse a CrossDomainSampler sharded for another world size or rank."""
    if not is_distributed():
        return
    if sampler is None:
        logger.warning("no sampler under torch.distributed: every rank trains on every sample each epoch; pass "
                       "CrossDomainSampler(..., num_replicas=world_size, rank=rank) to shard the epoch")
    elif isinstance(sampler, CrossDomainSampler) and (sampler.num_replicas, sampler.rank) != (get_world_size(), get_rank()):
        raise ValueError(
            f"sampler must shard the epoch over this run's processes: CrossDomainSampler(num_replicas="
            f"{get_world_size()}, rank={get_rank()}), got num_replicas={sampler.num_replicas}, rank={sampler.rank}"
        )


def _check_loss_and_miner(metric_loss, miner, memory) -> None:
    """Refuse a loss or miner that the training step would misuse or silently ignore."""
    if isinstance(metric_loss, ProtoOTLoss) and metric_loss.memory is not memory:
        raise ValueError("loss_funcs['metric_loss'] is a ProtoOTLoss on another memory; pass it the trainer's memory")
    if isinstance(metric_loss, ProtoOTLoss) and miner is not None:
        raise ValueError(
            f"mining_funcs['tuple_miner'] ({type(miner).__name__}) would be ignored: ProtoOTLoss takes its targets "
            "from the memory, not from mined pairs; drop the miner, or pair it with a PML loss (e.g. NTXentLoss)"
        )
    if isinstance(metric_loss, SelfSupervisedLoss):
        raise ValueError(
            "loss_funcs['metric_loss'] is a SelfSupervisedLoss: the trainer already makes each query's own key its "
            "positive (labels are sample indices, ref_emb the keys); pass the loss it wraps "
            f"({type(metric_loss.loss).__name__}) itself"
        )
    if isinstance(metric_loss, CrossBatchMemory):
        raise ValueError(
            "loss_funcs['metric_loss'] is a CrossBatchMemory, which takes no ref_emb, so the trainer's keys cannot "
            f"reach it; pass the loss it wraps ({type(metric_loss.loss).__name__}), which then contrasts each query "
            "with the batch's keys (the trainer keeps no queue of negatives: the PrototypeMemory banks feed the "
            "prototypes and neighbours)"
        )
    if isinstance(metric_loss, _IGNORES_REF_EMB):
        raise ValueError(
            f"loss_funcs['metric_loss'] is a {type(metric_loss).__name__}, which takes ref_emb but indexes its "
            "pairs into the queries (embeddings[p], a PML defect), so the trainer's keys would never reach it; "
            "pass another PML loss (e.g. NTXentLoss, MultiSimilarityLoss) or ProtoOTLoss"
        )
    if isinstance(miner, ProtoOTMiner) and miner.memory is not memory:
        raise ValueError(
            "mining_funcs['tuple_miner'] is a ProtoOTMiner on another memory; pass it the trainer's memory"
        )
    if isinstance(miner, ProtoOTMiner) and isinstance(metric_loss, pml_losses.AngularLoss):
        warnings.warn(
            "loss_funcs['metric_loss'] is an AngularLoss, which takes only the positive pairs of the mined tuples "
            "and makes every other sample a negative: the ProtoOTMiner's dropped negatives (likely class-mates) "
            "still reach it; pass a loss that reads its negatives from the tuples (e.g. NTXentLoss)",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    if isinstance(miner, ProtoOTMiner) and not miner.update_prototypes and not memory.reset_prototypes:
        warnings.warn(
            "mining_funcs['tuple_miner'] is a ProtoOTMiner(update_prototypes=False) and the memory has "
            "reset_prototypes=False: nothing moves the prototypes from their first K-means centroids during "
            "training (ProtoOTLoss moves them every step); pass ProtoOTMiner(memory, update_prototypes=True)",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    # Not under torch.distributed: a wrapped loss (PML's DistributedLossWrapper) would run its collectives
    # on the probe's CPU tensors.
    if metric_loss is not None and not isinstance(metric_loss, ProtoOTLoss) and not is_distributed():
        _check_takes_ref_emb(metric_loss, memory.dim)


def _check_takes_ref_emb(metric_loss, dim: int) -> None:
    """Refuse a PML loss that refuses ``ref_emb`` or ``ref_labels`` (``FastAPLoss``, the proxy losses,
    ``VICRegLoss``; ``MultipleLosses``, whose ``forward`` has no such argument) now rather than at the
    first step, after a whole pass over the data fills the banks: one call of a copy (the loss's own
    state and records stay untouched) on 4 random unit vectors, the trainer's call."""
    metric_loss = copy.deepcopy(metric_loss)
    device = model_device(metric_loss)
    embeddings = F.normalize(torch.randn(4, dim, generator=torch.Generator().manual_seed(0)), dim=1).to(device)
    labels = torch.arange(4, device=device)
    try:
        with torch.no_grad():
            metric_loss(embeddings, labels, ref_emb=embeddings.clone(), ref_labels=labels.clone())
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        if "ref_emb" in str(err) or "ref_labels" in str(err):  # PML's refusals and Python's unexpected keyword
            raise ValueError(
                f"loss_funcs['metric_loss'] ({type(metric_loss).__name__}) does not take ref_emb and ref_labels "
                f"({type(err).__name__}: {str(err).splitlines()[0]}), and the trainer compares each query with the "
                "momentum keys through them: pass a loss that does (e.g. NTXentLoss, MultiSimilarityLoss, "
                "ContrastiveLoss) or ProtoOTLoss"
            ) from err
        # Any other failure on this toy batch (e.g. a class count below 4) is the first real step's to
        # report, with the real inputs.


def _state_or_none(stateful):
    """``stateful.state_dict()`` for a sampler or dataset that has one (random draws of its own)."""
    return stateful.state_dict() if hasattr(stateful, "state_dict") else None


def _state_dicts(named) -> dict:
    return {name: value.state_dict() for name, value in named.items()}


def _rounding_generator_state(ema) -> dict | None:
    """``{"device": type, "state": tensor}`` of the private generator of timm's stochastic rounding of
    bfloat16 EMA weights (recent timm; part of an exact resume for bfloat16 models), ``None`` without one."""
    generator = getattr(ema, "_sr_generator", None)
    return None if generator is None else {"device": generator.device.type, "state": generator.get_state()}


def _set_rounding_generator_state(ema, saved: dict | None) -> None:
    """Restore :func:`_rounding_generator_state`; a CPU and a CUDA generator's states do not convert."""
    generator = getattr(ema, "_sr_generator", None)
    if generator is None or saved is None:
        return
    if saved["device"] != generator.device.type:
        logger.warning("the checkpoint's bfloat16 EMA rounding generator is a %s one, this key encoder's a %s one: "
                       "it starts afresh (bfloat16 runs resume exactly only on the same device type)",
                       saved["device"], generator.device.type)
        return
    generator.set_state(saved["state"])


def _rng_state() -> dict:
    """torch, CUDA, numpy and python RNG states as tensors and plain values (``weights_only`` loadable)."""
    _, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(numpy_keys.astype(np.int64)), numpy_position, numpy_has_gauss, numpy_gauss],
        "python": [python_version, torch.tensor(python_internal, dtype=torch.int64), python_gauss],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # The GPUs this process sees; a run saved with more resumes on fewer (torch would index past them).
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = state["numpy"]
    numpy_keys = numpy_keys.numpy().astype(np.uint32)
    np.random.set_state(("MT19937", numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss))
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal.tolist()), python_gauss))
