"""Label-free batch sampling with an equal share of every domain in each batch."""
from __future__ import annotations

import logging
import math

import numpy
import torch

from ._checks import as_index_tensor, check_bool, check_int, check_non_negative_int, check_positive_int

__all__ = ["CrossDomainSampler"]

logger = logging.getLogger(__name__)

_MAX_SEED = 2**63 - 1


class CrossDomainSampler(torch.utils.data.Sampler[int]):
    r"""Yield indices in blocks of ``batch_size`` holding ``batch_size / D`` samples of every domain.

    Only the domain of every sample is read, never its class label, so the sampler
    suits unsupervised training (ProtoOT: "each step one batch from every domain").

    With ``D`` domains of sizes :math:`N_1, \dots, N_D`, share :math:`b = B / D` and
    ``R = num_replicas``, one epoch is

    .. math::

        T = R \left\lceil \frac{\lceil N_{\max} / b \rceil}{R} \right\rceil

    blocks. Every domain's indices are shuffled (generator seeded from ``seed``, the
    epoch and the pass, below) and, for domains smaller than :math:`T b`, concatenated with fresh
    reshuffles until :math:`T b` indices are reached, so the first :math:`N_{\max}`
    entries of the largest domain cover it exactly once. Block ``t`` is the ``t``-th
    slice of ``b`` indices of domain 0, then of domain 1, ... (domains concatenated in
    ascending domain-id order inside a block, not interleaved). Rank ``r`` gets blocks
    ``r, r + R, r + 2R, ...``: shards are disjoint block sets of equal length. Their
    union is the single-process epoch when :math:`\lceil N_{\max} / b \rceil` is a
    multiple of ``R``; otherwise it is an epoch of the larger ``T`` blocks, whose
    reshuffles differ from the single-process epoch's.

    Every :meth:`__iter__` call starts a new *pass* over such an epoch with its own
    order. Pass ``p`` of an epoch shuffles with a generator seeded from ``(seed, epoch)``
    for ``p = 0`` and from ``(seed, epoch, p)`` otherwise (``numpy.random.SeedSequence(
    [seed, epoch], spawn_key=(p,))``); :meth:`set_epoch` (and :meth:`load_state_dict`)
    resets the pass count to 0. PML's trainers make a new iterator whenever the data runs
    out (``iterations_per_epoch`` longer than ``len(dataloader)``): those later passes are
    fresh orders, not repeats of the first. The passes after ``set_epoch(e)`` are the
    same on every run (pass 0 is the order of earlier releases, which had one pass per
    epoch), so an epoch replays exactly when the same iterators are made after
    :meth:`set_epoch`. Under DDP every rank makes the same number of passes (equal
    ``len`` and iterations), so within each pass the shards stay disjoint. A
    ``DataLoader`` iterates the sampler in the main process, also with workers: each
    ``iter(dataloader)`` (and each epoch of ``persistent_workers``) is one pass.
    ``shuffle=False`` gives every pass the same order.

    ``batch_size`` is the per-process batch: pass the same number as ``batch_size`` of
    the ``DataLoader`` or PML trainer so that each batch is exactly one block.
    PML trainers never call :meth:`set_epoch`; call it from ``end_of_epoch_hook`` (as
    below) or all epochs are passes of epoch 0, which :meth:`state_dict` records as
    epoch 0: a resumed run would replay them from the first (``ProtoOTTrainer`` calls
    it at the start of every epoch).

    Args:
        domains: ``(N,)`` integer domain id of every dataset index (any ids; at least
            two distinct ones). ``MultiDomainImageFolder.domain_ids`` fits.
        batch_size: indices per block; a multiple of the number of domains.
        num_replicas: number of processes sharing the epoch (DDP world size).
        rank: this process's rank in ``[0, num_replicas)``.
        seed: non-negative base seed; the order depends on ``seed``, the epoch and the
            pass number only.
        shuffle: ``False`` keeps each domain in index order (cycled the same way).

    Raises:
        TypeError: ``domains`` does not hold integers, or ``batch_size``, ``num_replicas``,
            ``rank`` or ``seed`` is not an integer (or ``shuffle`` not a bool).
        ValueError: ``domains`` not 1-D, fewer than two domains, ``batch_size`` not a positive
            multiple of the number of domains, or ``num_replicas``/``rank``/``seed`` out of range.

    Example:
        >>> from pml_protoot.samplers import CrossDomainSampler
        >>> sampler = CrossDomainSampler([0, 0, 0, 0, 1, 1], batch_size=4, shuffle=False)
        >>> list(sampler)
        [0, 1, 4, 5, 2, 3, 4, 5]
        >>> len(sampler)
        8
        >>> list(sampler)  # a second pass in the same epoch (identical here: shuffle=False)
        [0, 1, 4, 5, 2, 3, 4, 5]
        >>> sampler.set_epoch(1)  # in a PML trainer: end_of_epoch_hook=lambda t: sampler.set_epoch(t.epoch)
    """

    def __init__(self, domains, batch_size, *, num_replicas=1, rank=0, seed=0, shuffle=True):
        domains = as_index_tensor("domains", domains)
        self.domain_values = torch.unique(domains).tolist()
        if len(self.domain_values) < 2:
            raise ValueError(f"domains must hold at least two distinct domain ids, got {self.domain_values}")
        self.batch_size = check_positive_int("batch_size", batch_size)
        if batch_size % len(self.domain_values):
            raise ValueError(
                f"batch_size must be divisible by the number of domains ({len(self.domain_values)}), "
                f"got {batch_size}"
            )
        self.num_replicas = check_positive_int("num_replicas", num_replicas)
        self.rank = check_int("rank", rank, low=0, high=self.num_replicas - 1)
        self.seed = _check_seed(seed)
        self.shuffle = check_bool("shuffle", shuffle)
        self.epoch = 0
        self.passes = 0  # iterators started in this epoch; reset by set_epoch
        # One index tensor per domain, in ascending domain-id order.
        self.domain_indices = [torch.nonzero(domains == d).flatten() for d in self.domain_values]
        self.share = batch_size // len(self.domain_values)
        blocks = math.ceil(max(len(idx) for idx in self.domain_indices) / self.share)
        self.total_blocks = math.ceil(blocks / num_replicas) * num_replicas
        logger.debug(
            "CrossDomainSampler: %d domains, %d blocks of %d per epoch, %d per rank",
            len(self.domain_values), self.total_blocks, batch_size, self.total_blocks // num_replicas,
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose passes :meth:`__iter__` yields and restart at its first pass.

        With ``seed``, it fixes the order: the next :meth:`__iter__` gives pass 0 of
        ``epoch``, the one after it pass 1, and so on.

        Args:
            epoch: non-negative epoch number.

        Raises:
            TypeError: ``epoch`` is not an integer.
            ValueError: ``epoch`` is negative.
        """
        self.epoch = check_non_negative_int("epoch", epoch)
        self.passes = 0

    def epoch_blocks(self, pass_number: int = 0) -> torch.Tensor:
        """Return one pass of the epoch (all ranks) as a ``(total_blocks, batch_size)`` LongTensor.

        Args:
            pass_number: which pass of the current epoch (``0``: the first, which
                :meth:`__iter__` yields right after :meth:`set_epoch`). Reads no state
                and advances nothing.

        Raises:
            TypeError: ``pass_number`` is not an integer.
            ValueError: ``pass_number`` is negative.
        """
        pass_number = check_non_negative_int("pass_number", pass_number)
        # torch's CPU generator keeps only 32 bits of a seed: hash (seed, epoch[, pass]) into them.
        # Pass 0 keeps the plain (seed, epoch) entropy; later passes add a spawn key, whose
        # padded entropy cannot equal any (seed, epoch) one.
        spawn_key = (pass_number,) if pass_number else ()
        sequence = numpy.random.SeedSequence([self.seed, self.epoch], spawn_key=spawn_key)
        mixed = int(sequence.generate_state(1)[0])
        generator = torch.Generator().manual_seed(mixed)
        length = self.total_blocks * self.share
        streams = [self._domain_stream(idx, length, generator) for idx in self.domain_indices]
        # (D, T*b) -> (D, T, b) -> (T, D, b): block t holds b indices of each domain in turn.
        per_domain = torch.stack(streams).view(len(streams), self.total_blocks, self.share)
        return per_domain.transpose(0, 1).reshape(self.total_blocks, self.batch_size)

    def _domain_stream(self, indices: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
        """Concatenate (re)shuffled copies of ``indices`` until ``length`` entries exist."""
        copies = []
        for _ in range(math.ceil(length / len(indices))):
            copies.append(indices[torch.randperm(len(indices), generator=generator)] if self.shuffle else indices)
        return torch.cat(copies)[:length]

    def __iter__(self):
        """The next pass of the epoch: this rank's blocks of :meth:`epoch_blocks` (pass ``passes``).

        The pass is taken at the first ``next``, not here: a multi-worker ``DataLoader`` without
        automatic batching makes an iterator of its sampler and drops it unused before the one it
        reads, and that one must not use up a pass.
        """
        pass_number, self.passes = self.passes, self.passes + 1
        blocks = self.epoch_blocks(pass_number)[self.rank :: self.num_replicas]
        yield from blocks.flatten().tolist()

    def __len__(self) -> int:
        return self.total_blocks // self.num_replicas * self.batch_size

    def state_dict(self) -> dict:
        """Return ``{"epoch": int, "seed": int}``, enough to resume at an epoch boundary.

        The pass count is not saved (nor is any position inside a pass, which a sampler
        cannot know): exact resume is from a state saved at an epoch end, as
        ``ProtoOTTrainer``'s checkpoints are, followed by :meth:`set_epoch` of the next
        epoch. A state saved mid-epoch restarts that epoch from its first pass on load.
        """
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``epoch`` and ``seed`` from :meth:`state_dict` output (the pass count restarts at 0).

        Raises:
            ValueError: ``state`` lacks ``"epoch"`` or ``"seed"`` or holds bad values.
        """
        missing = {"epoch", "seed"} - set(state)
        if missing:
            raise ValueError(f"state must hold keys ['epoch', 'seed'], missing {sorted(missing)}")
        self.seed = _check_seed(state["seed"])
        self.set_epoch(state["epoch"])


def _check_seed(seed) -> int:
    return check_int("seed", seed, low=0, high=_MAX_SEED)
