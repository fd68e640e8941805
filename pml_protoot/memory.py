"""Per-domain memory banks, prototypes and class marginals (ProtoOT's state between steps)."""
from __future__ import annotations

import functools
import logging
import math
import time
import warnings

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ._checks import (
    as_index_tensor,
    caller_stacklevel,
    check_bool,
    check_choice,
    check_in_range,
    check_int,
    check_matrix,
    check_non_negative_int,
    check_number,
    check_positive_int,
)
from ._progress import progress_bar
from ._tensors import compute_dtype
from .distributed import all_gather_rows, broadcast_, get_rank, get_world_size
from .ot import _logits, _trusted_sinkhorn

__all__ = [
    "PrototypeMemory", "BankIndex", "MARGINAL_RULES", "NEIGHBOUR_SEARCHES", "exact_nearest_rows"
]

logger = logging.getLogger(__name__)

#: Ways ``PrototypeMemory.recluster`` can set the class marginals (see its docstring).
MARGINAL_RULES = ("official", "matched", "assignment", "uniform")
#: The rules that read K-means cluster sizes at every recluster.
CLUSTER_SIZE_RULES = ("official", "matched")

#: Ways ``PrototypeMemory.nearest_rows`` can search a bank (see the class docstring).
NEIGHBOUR_SEARCHES = ("exact", "ivf", "auto")

#: ``neighbour_search="auto"`` uses the IVF index for banks with at least this many rows (``refresh_every > 1``).
AUTO_IVF_MIN_ROWS = 100_000
#: Bookkeeping buffers read in Python on every step, kept on the CPU on any device (see ``_apply``).
HOST_BUFFERS = ("epoch", "refresh_countdown", "potentials_valid")
#: Buffers kept in float32 at least whatever the memory's dtype: a step adds about B / N_d to the prototype
#: means, below a float16 or bfloat16 ulp of a mean on a large bank, so the additions would round away; the
#: column potentials reach about max |S| / epsilon, past float16's range at a small epsilon (D x D x K values).
ACCUMULATOR_BUFFERS = ("prototype_means", "column_potentials")
#: The cached OT of ``refresh_every > 1``: derived state, which a full OT rebuilds.
REFRESH_CACHE_BUFFERS = (
    "refresh_countdown", "potentials_valid", "column_potentials", "reference_prototypes", "prototype_means"
)
#: Bank rows a half-precision memory upcasts at a time to score them in float32: a bounded temporary.
SCORE_CHUNK_ROWS = 65_536


def _outside_autocast(method):
    """Run a memory method with the memory's device type's autocast off, so that a caller's
    ``torch.autocast`` does not lower its precision: banks and prototypes are computed in the memory's
    dtype, scores and Sinkhorn in float32 at least (``assign`` of a half-precision memory returns float32)."""
    @functools.wraps(method)
    def in_memory_dtype(self, *args, **kwargs):
        with torch.autocast(self.prototypes.device.type, enabled=False):
            return method(self, *args, **kwargs)

    return in_memory_dtype


class PrototypeMemory(torch.nn.Module):
    r"""One memory bank per domain, K prototypes per domain and their class marginals.

    Global sample ``i`` lives in bank ``domain_of[i]`` at row ``row_of[i]``: its rank
    among the samples of its domain (banks are indexed by sample, not FIFO queues).
    Domains are addressed by *slot* ``0..D-1``: the user's domain ids sorted ascending
    (``domain_ids[slot]`` gives the original id back).

    With bank :math:`M_d` (:math:`N_d \times` ``dim``), prototypes :math:`C_d`
    (:math:`K \times` ``dim``) and class marginal :math:`\beta_d` (:math:`K`):

    * :meth:`assign`: :math:`P = \mathrm{sinkhorn}(M_d C_{d'}^\top, \beta_d)`, an
      :math:`N_d \times K` soft assignment whose rows sum to 1;
    * :meth:`update_prototypes`: :math:`C_d \leftarrow \mathrm{normalise}(P^\top M_d)`;
    * :meth:`recluster`: faiss K-means per bank (on up to 2,000 rows per prototype, a random
      subsample beyond, as the official code); the first call sets :math:`C_d` to the
      L2-normalised centroids, every call sets :math:`\beta_d` by ``marginal_rule`` and,
      with ``reset_prototypes=True``, later calls reset :math:`C_d` to the new
      centroids matched to the current prototypes (Hungarian on cosine similarity), so
      prototype :math:`k` stays prototype :math:`k` while escaping its first clustering.

    Banks, prototypes, marginals, the ``written`` mask and ``epoch`` are buffers, so
    ``state_dict()``/``load_state_dict()`` round-trip exactly and ``.to()`` moves all. The
    methods that compute state run with autocast off on the memory's device, so inside a
    caller's ``torch.autocast`` it is still computed in the memory's dtype.

    Training steps (:meth:`step_pseudo_labels`, :meth:`cross_pseudo_labels`, used by
    ``ProtoOTLoss``) cost :math:`O(N_d K)` per domain with ``refresh_every=1`` (exact
    ProtoOT: full OT and prototype update every step). With ``refresh_every=R > 1``
    the full OT runs once every ``R`` steps of a domain (and after every
    :meth:`recluster`); in between, work is :math:`O(B K \cdot \text{dim})`:

    * the plan's column potential :math:`g` (``K``) is kept from the last full OT
      (``sinkhorn(..., return_potentials=True)``, from its scaling vectors): every
      row of a Sinkhorn plan is :math:`P_n = \mathrm{softmax}(s_n/\varepsilon + g)`
      (``s_n`` the row's scores against the prototypes used by that OT), so a batch row
      is labelled :math:`\arg\max_k (s_{nk}/\varepsilon + g_k)`: exact for a key that did
      not change since the full OT (both score in float32 at least, a half-precision memory's
      rows upcast), an approximation for a new key; :math:`g` is kept in float32 at least;
    * the prototype means :math:`\Sigma = \tilde P^\top M_d / N_d` are updated as :meth:`fill`
      writes rows (old rows' contributions out, new ones in, with that row formula),
      and :math:`C_d = \mathrm{normalise}(\Sigma)` each step (means, not sums, kept in float32
      at least: a step moves them by about :math:`B / N_d` of a key, below a half-precision ulp).

    Nearest neighbours (:meth:`nearest_rows`, the loss's :math:`\mathrm{nn}` term):
    ``neighbour_search="exact"`` is brute force, :math:`O(B N_d \cdot \text{dim})`
    per step; ``"ivf"`` searches a :class:`BankIndex` per domain (faiss ``IndexIVFFlat``,
    inner product, ``ivf_nlist`` lists, default :math:`\sqrt{N_d}`, rebuilt at every
    :meth:`recluster`) plus an exact buffer of the rows written since: exact for those
    rows and for the own-row exclusion, approximate only through probing ``ivf_nprobe``
    lists (``ivf_nprobe >= ivf_nlist`` is exact); ``"auto"`` (default) uses the index only
    with ``refresh_every > 1``, from ``AUTO_IVF_MIN_ROWS`` (100,000) rows a domain, and is
    exact otherwise: with ``refresh_every=1`` every step solves the OT over the whole bank,
    beside which the exact search costs a few per cent. The index holds a float32 CPU copy
    of the bank. The defaults (``refresh_every=1``, ``"auto"``) are exact ProtoOT at any size; with
    ``refresh_every=R > 1`` and ``"ivf"``/``"auto"`` no step does full-bank work except
    one refresh in ``R``, and the other per-step terms are :math:`O(B K \cdot \text{dim})`.
    Measured on one shared CPU thread (``benchmarks/bench_step.py``, K = 7, 64 keys x 2
    domains, ``refresh_every=10``, ``"auto"``, ``ivf_nprobe=32``): ProtoOTLoss alone
    takes 0.23 s a step at :math:`10^6` rows a domain (mean; exact: 2.4 s; 0.03 s at
    :math:`10^4`), and the whole resnet18 training step at :math:`10^6` rows costs
    1.02x (mean) the exact step at :math:`10^4` (exact at :math:`10^6`: 1.31x; at
    :math:`10^5`: 1.05x and 1.01x), timed in interleaved rounds on a loaded machine. The IVF's recall@1 depends
    on the data: 0.31 on random unit keys at :math:`10^6` (its worst case: no cluster
    structure). On pacs-mini (``benchmarks/accuracy.py`` ablation, 30 epochs, 3 seeds, 8
    directions) ``refresh_every=10``, a deliberately coarse IVF (1 of 8 lists probed, 64-row
    buffer) and both together scored the exact default's mean P@15 and mAP within 0.2 points.

    The IVF index is derived state, not a buffer: ``load_state_dict`` drops it and the
    next search rebuilds it from the loaded banks, so after a resume the approximate
    neighbours can differ from those of an uninterrupted run. ``load_state_dict`` refuses
    (``ValueError``) a state dict saved for another sample layout: one whose
    ``domain_of``/``row_of`` send a global index to another domain or bank row than this
    memory's ``domains`` (files added, removed or reordered since the checkpoint).

    The module pickles (``pickle``, ``copy.deepcopy``, ``torch.save`` of the module or
    of a loss holding it, ``torch.multiprocessing``): IVF indexes travel as faiss
    serialisations, so an unpickled memory returns the same neighbours as the original.

    Many processes: with ``torch.distributed`` initialised, :meth:`fill` all-gathers keys
    and indices (every rank writes every rank's batch, so banks stay identical) and
    :meth:`recluster` runs K-means on rank 0 and broadcasts centroids and cluster sizes;
    the OT is deterministic, so all ranks hold the same prototypes.

    Args:
        domains: ``(N,)`` integer sequence or tensor, the domain id of every global
            sample index; at least two distinct ids.
        dim: embedding size of the stored keys.
        num_prototypes: ``K``, prototypes per domain; at most the size of the smallest domain.
        epsilon: Sinkhorn entropic regularisation. 0.1 by default; ProtoOT's 0.05, which
            ``ProtoOTLoss(official=True)`` sets, scored lower on pacs-mini (mAP on all 8
            paired directions, mean P@15 62.2 against 63.3) with a wider seed spread (README,
            accuracy section).
        sinkhorn_iterations: Sinkhorn rounds (3 in ProtoOT).
        normalize_scores: L2-normalise each row of :math:`M_d C^\top` before Sinkhorn,
            as the official code does (``False`` by default: raw cosine similarities). The
            division by the row norm, which grows with :math:`\sqrt K`, scales the effective
            ``epsilon`` with the number of prototypes; it scored higher on pacs-mini (K = 7), and
            with τ 0.4 at 60 epochs it widened the seed spread of two directions (README,
            accuracy section).
        marginal_rule: how :meth:`recluster` sets :math:`\beta_d`: ``"uniform"``
            (:math:`1/K`, equal-sized classes; default), ``"official"`` (K-means cluster
            sizes in K-means order: the original code, mis-ordered after the first epoch),
            ``"matched"`` (cluster sizes reordered to the current prototypes by Hungarian
            matching of centroid-prototype cosine similarity) or ``"assignment"`` (column
            sums of the current :meth:`assign` divided by :math:`N_d`). Uniform scored best
            in the pacs-mini accuracy benchmark (``benchmarks/accuracy.py``, ablation rows
            "beta ..."): K-means sizes of an untrained or half-trained encoder are a noisy
            estimate of the class sizes, and the OT follows them. With ``"uniform"`` or
            ``"assignment"`` and no ``reset_prototypes``, only the first :meth:`recluster`
            runs K-means.
        kmeans_niter: K-means iterations per run (50 in ProtoOT).
        kmeans_nredo: K-means restarts, the best kept (20 in ProtoOT).
        kmeans_seed: K-means random seed, a 32-bit signed integer (0 in ProtoOT).
        reset_prototypes: every :meth:`recluster` after the first also sets :math:`C_d` to
            the L2-normalised centroids, each matched to the prototype it is most similar
            to (Hungarian assignment). ``False`` (default) is the official code:
            prototypes come from K-means once, at epoch 0, and then only follow the OT
            updates, so they keep the untrained encoder's first clustering. The reset helped
            when that clustering was poor (with a random head, +2.2 mean P@15 in an earlier
            pacs-mini ablation, ``benchmarks/accuracy.py``); with the head started by
            :func:`~pml_protoot.backbones.pca_init_` it is level there (59.8 with, 59.7
            without; ablation row "prototypes reset every epoch").
        refresh_every: training steps of a domain between full OT refreshes (see
            above); 1 (default) is exact ProtoOT.
        neighbour_search: ``"auto"`` (default), ``"exact"`` or ``"ivf"`` (see above).
        ivf_nlist: IVF lists per bank; ``None`` (default) is :math:`\sqrt{N_d}`, rounded.
        ivf_nprobe: IVF lists probed per query (32; capped at the list count).
        ivf_buffer_rows: rows written since the last flush that are searched exactly
            before going back into the IVF (4096).

    Raises:
        TypeError: ``domains`` is not an integer sequence, or an option of the wrong type (a
            float where an integer is due, a string for a number or a flag).
        ValueError: fewer than two domains, a domain with fewer than two samples
            (a nearest neighbour other than the sample itself must exist), more
            prototypes than samples in a domain, or an option value out of range.

    Example:
        >>> import torch
        >>> from pml_protoot.memory import PrototypeMemory
        >>> memory = PrototypeMemory([0, 0, 0, 1, 1, 1], dim=4, num_prototypes=2, kmeans_nredo=1)
        >>> memory.fill(torch.nn.functional.normalize(torch.randn(6, 4), dim=1), torch.arange(6))
        >>> memory.recluster(epoch=0)
        >>> memory.prototypes.shape, memory.assign(1).shape
        (torch.Size([2, 2, 4]), torch.Size([3, 2]))
        >>> memory.split_by_domain(torch.tensor([4, 0]))
        [(0, tensor([1]), tensor([0])), (1, tensor([0]), tensor([1]))]
    """

    def __init__(
        self,
        domains,
        dim: int,
        num_prototypes: int,
        *,
        epsilon: float = 0.1,
        sinkhorn_iterations: int = 3,
        normalize_scores: bool = False,
        marginal_rule: str = "uniform",
        kmeans_niter: int = 50,
        kmeans_nredo: int = 20,
        kmeans_seed: int = 0,
        reset_prototypes: bool = False,
        refresh_every: int = 1,
        neighbour_search: str = "auto",
        ivf_nlist: int | None = None,
        ivf_nprobe: int = 32,
        ivf_buffer_rows: int = 4096,
    ):
        super().__init__()
        domains = as_index_tensor("domains", domains, device="cpu")
        self.dim = check_positive_int("dim", dim)
        self.num_prototypes = check_positive_int("num_prototypes", num_prototypes)
        self.epsilon = check_number("epsilon", epsilon, low=0, strict=True)
        self.sinkhorn_iterations = check_positive_int("sinkhorn_iterations", sinkhorn_iterations)
        self.normalize_scores = check_bool("normalize_scores", normalize_scores)
        check_choice("marginal_rule", marginal_rule, MARGINAL_RULES)
        self.marginal_rule = marginal_rule
        self.kmeans_niter = check_positive_int("kmeans_niter", kmeans_niter)
        self.kmeans_nredo = check_positive_int("kmeans_nredo", kmeans_nredo)
        self.kmeans_seed = check_int("kmeans_seed", kmeans_seed, low=-(2**31), high=2**31 - 1)  # faiss: a C int
        self.reset_prototypes = check_bool("reset_prototypes", reset_prototypes)
        self.refresh_every = check_positive_int("refresh_every", refresh_every)

        domain_ids, domain_of, sizes = torch.unique(domains, sorted=True, return_inverse=True, return_counts=True)
        self._check_domain_sizes(domain_ids, sizes)
        self.num_domains = len(domain_ids)
        self.register_buffer("domain_ids", domain_ids)
        self.register_buffer("domain_of", domain_of)
        self.register_buffer("row_of", self._rank_within_domain(domain_of))
        for slot, size in enumerate(sizes.tolist()):
            self.register_buffer(f"bank_{slot}", torch.zeros(size, self.dim))
        self.register_buffer("written", torch.zeros(len(domains), dtype=torch.bool))
        self.register_buffer("prototypes", torch.zeros(self.num_domains, self.num_prototypes, self.dim))
        self.register_buffer(
            "class_marginals", torch.full((self.num_domains, self.num_prototypes), 1.0 / self.num_prototypes)
        )
        self.register_buffer("epoch", torch.tensor(-1, dtype=torch.long))
        if self.refresh_every > 1:
            self._register_refresh_cache()
        self._set_neighbour_search(neighbour_search, ivf_nlist, ivf_nprobe, ivf_buffer_rows)

    def _set_neighbour_search(self, neighbour_search, ivf_nlist, ivf_nprobe, ivf_buffer_rows) -> None:
        check_choice("neighbour_search", neighbour_search, NEIGHBOUR_SEARCHES)
        self.neighbour_search = neighbour_search
        self.ivf_nlist = None if ivf_nlist is None else check_positive_int("ivf_nlist", ivf_nlist)
        self.ivf_nprobe = check_positive_int("ivf_nprobe", ivf_nprobe)
        self.ivf_buffer_rows = check_positive_int("ivf_buffer_rows", ivf_buffer_rows)
        # Per-slot BankIndex: derived state, rebuilt by recluster() or on first use (not in the state_dict);
        # _load_from_state_dict drops it. No lambda hook here: the module must stay picklable.
        self._bank_indexes: dict[int, BankIndex] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Refuse a checkpoint of another sample layout, load, then drop the IVF indexes of the old banks."""
        self._check_sample_layout(state_dict, prefix)
        self._check_banks_fit(state_dict, prefix)
        self._check_class_marginals(state_dict, prefix)
        self._convert_prototype_sums(state_dict, prefix)
        self._match_refresh_cache(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._bank_indexes.clear()  # rebuilt from the loaded banks at the next search
        self._keep_host_buffers_on_cpu()  # load_state_dict(assign=True) puts in the saved tensors, on any device
        for name in ACCUMULATOR_BUFFERS:  # and in their dtypes: a float16 one from an older checkpoint
            buffer = self._buffers.get(name)
            if buffer is not None:
                self._buffers[name] = buffer.to(compute_dtype(buffer))

    def _keep_host_buffers_on_cpu(self) -> None:
        for name in HOST_BUFFERS:
            buffer = self._buffers.get(name)
            if buffer is not None and buffer.device.type not in ("cpu", "meta"):  # meta holds no values to copy
                self._buffers[name] = buffer.cpu()

    def _check_banks_fit(self, state_dict, prefix: str) -> None:
        """Raise unless every saved bank is finite in this memory's bank dtype: loading casts, and
        a float32 checkpoint's keys past 65,504 would silently become inf in a float16 memory."""
        for slot in range(self.num_domains):
            name = f"bank_{slot}"
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and saved.is_floating_point():
                _cast_finite(f"state_dict[{prefix + name!r}]", saved, self.bank(slot).dtype)

    def _check_class_marginals(self, state_dict, prefix: str) -> None:
        """Raise unless every saved class marginal is finite, non-negative and not all zero: Sinkhorn takes
        the memory's marginals unread (``_trusted_sinkhorn``), so a bad one would give a silently wrong plan."""
        saved = state_dict.get(prefix + "class_marginals")
        if not isinstance(saved, torch.Tensor) or saved.shape != self.class_marginals.shape:
            return  # load_state_dict's own error
        saved = saved.detach().double().cpu()
        if not (torch.isfinite(saved).all() and (saved >= 0).all() and (saved.sum(dim=1) > 0).all()):
            raise ValueError(
                f"state_dict[{prefix + 'class_marginals'!r}] must be finite, non-negative and not all zero in any "
                f"domain, got min {saved.min().item():.3g} and per-domain sums {saved.sum(dim=1).tolist()}"
            )

    def _convert_prototype_sums(self, state_dict, prefix: str) -> None:
        r"""Checkpoints of ``refresh_every > 1`` made before the cache held means kept ``prototype_sums``
        (:math:`\tilde P^\top M_d`): divide by the bank sizes into ``prototype_means``."""
        sums = state_dict.pop(prefix + "prototype_sums", None)
        if sums is not None and prefix + "prototype_means" not in state_dict:
            sizes = torch.bincount(self.domain_of.cpu(), minlength=self.num_domains).to(sums)
            state_dict[prefix + "prototype_means"] = sums / sizes[:, None, None]

    def _match_refresh_cache(self, state_dict, prefix: str) -> None:
        """Load a checkpoint of another ``refresh_every``: an exact memory drops the saved OT cache; a
        cached one given none starts with every domain due for a full OT (countdown 0, no plan valid)."""
        saved = [name for name in REFRESH_CACHE_BUFFERS if prefix + name in state_dict]
        if self.refresh_every == 1:
            for name in saved:
                del state_dict[prefix + name]
        elif not saved:
            for name in REFRESH_CACHE_BUFFERS:
                state_dict[prefix + name] = torch.zeros_like(self._buffers[name])

    def _check_sample_layout(self, state_dict, prefix: str) -> None:
        """Raise unless the checkpoint maps every global index to the domain and row the constructor's
        ``domains`` do: loading its layout would silently re-address the user's dataset indices."""
        names = ("domain_ids", "domain_of", "row_of")
        if any(prefix + name not in state_dict for name in names):
            return  # missing keys are load_state_dict's own (strict) error
        saved_ids, saved_domain_of, saved_row_of = (state_dict[prefix + name].cpu() for name in names)
        if len(saved_domain_of) != self.num_samples:
            raise ValueError(
                f"state_dict was made for another sample layout: {len(saved_domain_of)} sample indices, but this "
                f"memory's domains give {self.num_samples} (files added or removed since the checkpoint?)"
            )
        own_ids = self.domain_ids.cpu()[self.domain_of.cpu()]
        differs = (saved_ids[saved_domain_of] != own_ids) | (saved_row_of != self.row_of.cpu())
        if differs.any():
            raise ValueError(
                "state_dict was made for another sample order/domain assignment (files added or reordered since "
                f"the checkpoint?): {int(differs.sum())} of {self.num_samples} indices map to another domain or "
                f"bank row than this memory's domains give (first: {torch.nonzero(differs).flatten()[:5].tolist()}); "
                "build the memory with the checkpoint's domains"
            )

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()``, ...: every buffer but :data:`HOST_BUFFERS`, which stay on the
        CPU. Python reads them every step (``int(memory.epoch)``, the refresh countdown); on a GPU each read
        would wait for all queued work. They are integers and flags, so no dtype cast applies to them.
        :data:`ACCUMULATOR_BUFFERS` move with the rest but keep float32 at least (float64 follows).

        Raises:
            ValueError: a cast to a narrower dtype (``.half()``) would make a finite entry infinite, as
                :meth:`fill` refuses keys past float16's 65,504; the memory is left as it was.
        """
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        try:
            for name, buffer in before.items():
                if not (buffer.is_meta or self._buffers[name].is_meta):
                    _cast_finite(f"memory.{name}", buffer, self._buffers[name].dtype)  # free when not narrower
        except ValueError:
            self._buffers.update(before)
            raise
        for name in [name for name in ACCUMULATOR_BUFFERS if name in before]:  # the refresh cache's, if any
            moved, original = self._buffers[name], before[name]
            dtype = compute_dtype(moved)
            # Recast from the values before a half-precision cast; a meta tensor holds none (to_empty).
            source = moved if moved.dtype == dtype or original.is_meta else original
            self._buffers[name] = source.to(device=moved.device, dtype=dtype)
        # Only CPU tensors are kept: a buffer that got elsewhere (a meta memory) takes fn's result, as before.
        self._buffers.update({name: before[name] for name in HOST_BUFFERS
                              if name in before and before[name].device.type == "cpu"})
        self._keep_host_buffers_on_cpu()
        return self

    def _register_refresh_cache(self) -> None:
        """Buffers of the cached OT (``refresh_every > 1`` only: exact memories keep their state_dict)."""
        domains, prototypes = self.num_domains, self.num_prototypes
        # Steps of each domain until its next full OT; 0 = due.
        self.register_buffer("refresh_countdown", torch.zeros(domains, dtype=torch.long))
        # [d, d']: is the cached plan of bank d against prototypes of d' usable?
        self.register_buffer("potentials_valid", torch.zeros(domains, domains, dtype=torch.bool))
        self.register_buffer("column_potentials", torch.zeros(domains, domains, prototypes))
        self.register_buffer("reference_prototypes", torch.zeros(domains, domains, prototypes, self.dim))
        self.register_buffer("prototype_means", torch.zeros(domains, prototypes, self.dim))

    def _check_domain_sizes(self, domain_ids: torch.Tensor, sizes: torch.Tensor) -> None:
        if len(domain_ids) < 2:
            raise ValueError(f"domains must hold at least 2 distinct domain ids, got {domain_ids.tolist()}")
        smallest = int(sizes.min())
        small_id = int(domain_ids[sizes.argmin()])
        if smallest < 2:
            raise ValueError(f"domains must give every domain at least 2 samples, domain {small_id} has {smallest}")
        if self.num_prototypes > smallest:
            raise ValueError(
                f"num_prototypes must be at most the size of the smallest domain ({smallest}, domain {small_id}), "
                f"got {self.num_prototypes}"
            )

    @staticmethod
    def _rank_within_domain(domain_of: torch.Tensor) -> torch.Tensor:
        """Row of every global index inside its bank: its rank among its domain's indices."""
        order = torch.argsort(domain_of, stable=True)
        starts = torch.cumsum(torch.bincount(domain_of), 0) - torch.bincount(domain_of)
        row_of = torch.empty_like(domain_of)
        row_of[order] = torch.arange(len(domain_of)) - starts[domain_of[order]]
        return row_of

    @property
    def num_samples(self) -> int:
        """Total number of global sample indices ``N``."""
        return len(self.domain_of)

    def bank(self, domain: int) -> torch.Tensor:
        """Return the ``(N_d, dim)`` bank of domain slot ``domain`` (the buffer itself, not a copy)."""
        return getattr(self, f"bank_{self._check_slot('domain', domain)}")

    def _check_slot(self, name: str, slot) -> int:
        return check_int(f"{name} (a domain slot)", slot, low=0, high=self.num_domains - 1)

    def check_indices(self, name: str, indices) -> torch.Tensor:
        """Return ``indices`` as a 1-D long tensor on the memory's device, or raise naming ``name``."""
        indices = as_index_tensor(name, indices, device=self.domain_of.device)
        check_in_range(name, indices, self.num_samples)
        return indices

    def check_rows(self, name: str, rows, domain: int) -> torch.Tensor:
        """Return bank ``rows`` of slot ``domain`` as a 1-D long tensor on the memory's device, or raise naming
        ``name``. The range check syncs with the device exactly as :meth:`check_indices` (run by :meth:`fill`) does."""
        rows = as_index_tensor(name, rows, device=self.row_of.device)
        check_in_range(f"{name} (bank rows of domain slot {domain})", rows, len(self.bank(domain)))
        return rows

    def split_by_domain(self, indices, across_ranks: bool = False) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Group a batch of global indices by domain.

        Args:
            indices: ``(B,)`` global sample indices.
            across_ranks: also list, with empty ``positions`` and ``rows``, the domains that only
                other ranks' batches hold (a collective under ``torch.distributed``; the same list
                on every rank). A training step updates the state of every domain of its global
                batch (prototypes, refresh countdowns and caches), so every rank must, or their
                memories drift apart whenever a rank's batch lacks a domain.

        Returns:
            For each domain present, in slot order: ``(slot, positions, rows)`` where
            ``positions`` are the batch positions of its samples and ``rows`` their bank rows.
        """
        indices = self.check_indices("indices", indices)
        slots = self.domain_of[indices]
        present = torch.unique(slots)
        if across_ranks and get_world_size() > 1:  # one process: no second pass and device sync
            present = torch.unique(all_gather_rows(present))
        groups = []
        for slot in present.tolist():
            positions = torch.nonzero(slots == slot).flatten()
            groups.append((slot, positions, self.row_of[indices[positions]]))
        return groups

    @_outside_autocast
    def fill(self, keys: torch.Tensor, indices) -> None:
        """Write ``keys`` (detached, cast to the bank dtype, otherwise as given) into their bank rows.

        Under ``torch.distributed`` (more than one process) this is a collective: every
        rank's keys and indices are all-gathered (rank order) and written on every rank.
        With ``refresh_every > 1`` the prototype means follow the written rows (class docstring).

        Args:
            keys: ``(B, dim)`` floating tensor, finite also in the bank dtype (a float16
                memory holds keys up to 65,504 in absolute value), e.g. L2-normalised
                momentum-encoder keys.
            indices: ``(B,)`` global sample indices; for a repeated index the last key wins.

        Raises:
            TypeError, ValueError: bad ``keys`` or ``indices``, or keys that overflow the
                bank dtype; nothing is written then (under ``torch.distributed`` the overflow
                check runs on the gathered keys, so every rank raises it alike).
        """
        indices = self.check_indices("indices", indices)
        check_matrix("keys", keys, rows=len(indices), cols=self.dim)
        keys = all_gather_rows(keys.detach())
        indices = all_gather_rows(indices)
        # After the gather every rank holds the same keys: all raise here alike, before any write.
        keys = _cast_finite("keys", keys, self.bank(0).dtype)  # banks share the memory's dtype
        is_last = self._last_occurrence(indices)
        indices, keys = indices[is_last], keys[is_last.to(keys.device)]
        for slot, positions, rows in self.split_by_domain(indices):
            bank = self.bank(slot)
            new_keys = keys[positions.to(keys.device)].to(device=bank.device, dtype=bank.dtype)
            if self._has_cached_plan(slot, slot):
                self._move_prototype_means(slot, rows, new_keys)
            bank[rows] = new_keys
            if slot in self._bank_indexes:
                self._bank_indexes[slot].mark_written(rows, bank)
        self.written[indices] = True

    def _move_prototype_means(self, slot: int, rows: torch.Tensor, new_keys: torch.Tensor) -> None:
        """Swap the cached-plan contributions of bank ``rows`` for those of ``new_keys`` in the prototype means.

        Summed in float32 at least: a batch's float16 sum overflows past 65,504 where every
        key fits; the means themselves stay within the largest key, so they fit the dtype.
        """
        bank = self.bank(slot)
        change = _weighted_sums(self._plan_rows(slot, slot, new_keys), new_keys)
        change -= _weighted_sums(self._plan_rows(slot, slot, bank[rows]), bank[rows])
        self.prototype_means[slot] += (change / len(bank)).to(self.prototype_means.dtype)

    @staticmethod
    def _last_occurrence(indices: torch.Tensor) -> torch.Tensor:
        r"""Mask of the positions holding the last occurrence of each index (deterministic writes).

        :math:`O(B \log B)`: indexed by the batch's distinct indices, not by the bank size.
        """
        positions = torch.arange(len(indices), device=indices.device)
        distinct, slot_of = torch.unique(indices, return_inverse=True)
        last = torch.full((len(distinct),), -1, device=indices.device)
        last = last.scatter_reduce(0, slot_of, positions, reduce="amax")
        return last[slot_of] == positions

    def check_ready(self) -> None:
        """Raise ``ValueError`` unless :meth:`recluster` has set the prototypes."""
        if int(self.epoch) < 0:
            raise ValueError(
                "memory must be filled and reclustered before use (call memory.fill(keys, indices) for every "
                "sample, then memory.recluster(epoch)); got a memory that was never reclustered"
            )

    @_outside_autocast
    def assign(self, domain: int, prototype_domain: int | None = None) -> torch.Tensor:
        r"""Soft-assign a bank to a domain's prototypes by Sinkhorn under ``domain``'s marginal.

        :math:`P = \mathrm{sinkhorn}(M_d C_{d'}^\top, \beta_d, \varepsilon, \text{iterations})`
        with :math:`d` = ``domain`` and :math:`d'` = ``prototype_domain`` (default :math:`d`).

        Returns:
            ``(N_d, K)`` assignment, rows summing to 1, no gradient.

        Raises:
            ValueError: bad slot, or the memory was never reclustered.
        """
        domain = self._check_slot("domain", domain)
        prototype_domain = domain if prototype_domain is None else self._check_slot("prototype_domain", prototype_domain)
        self.check_ready()
        return self._sinkhorn(domain, self.prototypes[prototype_domain])

    def _sinkhorn(self, domain: int, prototypes: torch.Tensor, return_potentials: bool = False, rows=None):
        """Sinkhorn of bank ``domain`` against ``(K, dim)`` ``prototypes`` under ``domain``'s class marginal
        and the memory's settings (with ``return_potentials``, ``(plan, column potentials)``; with ``rows``,
        those rows of the plan only). The scores are this call's own, so Sinkhorn may overwrite them."""
        score = functools.partial(_scores, self.bank(domain), prototypes)
        return _trusted_sinkhorn(
            score(),
            self.class_marginals[domain],  # set by recluster or a checked state dict
            self.epsilon,
            self.sinkhorn_iterations,
            self.normalize_scores,
            return_potentials=return_potentials,
            rows=rows,
            rescore=score,
        )

    def _ot_logits(self, scores: torch.Tensor) -> torch.Tensor:
        """The logits Sinkhorn exponentiates, computed as it computes them (``ot._logits``): ``scores /
        epsilon``, rows L2-normalised first if asked, in float32 at least (in float16, scores past 6,550
        over epsilon 0.1 overflow). The same arithmetic, bit for bit, so that the cached potentials fit them."""
        return _logits(scores, self.epsilon, self.normalize_scores)

    def _has_cached_plan(self, domain: int, prototype_domain: int) -> bool:
        return self.refresh_every > 1 and bool(self.potentials_valid[domain, prototype_domain])

    def _plan_rows(self, domain: int, prototype_domain: int, keys: torch.Tensor) -> torch.Tensor:
        r"""Rows of the cached plan for ``keys`` (B, dim): :math:`\mathrm{softmax}(s/\varepsilon + g)`, (B, K).

        Computed in float32 at least (see :meth:`_ot_logits`); so are the scores, which in
        float16 overflow for keys longer than 65,504.
        """
        scores = _scores(keys, self.reference_prototypes[domain, prototype_domain])
        return torch.softmax(self._ot_logits(scores) + self.column_potentials[domain, prototype_domain], dim=1)

    def _full_plan(self, domain: int, prototype_domain: int, rows=None) -> torch.Tensor:
        """:meth:`assign` (``rows`` of it only, if given), caching its column potentials and prototypes when
        ``refresh_every > 1``."""
        prototypes = self.prototypes[prototype_domain]
        if self.refresh_every == 1:
            return self._sinkhorn(domain, prototypes, rows=rows)
        # -inf potential: a column without mass
        assignment, potentials = self._sinkhorn(domain, prototypes, return_potentials=True, rows=rows)
        self.column_potentials[domain, prototype_domain] = potentials  # float32 at least, as Sinkhorn computes
        self.reference_prototypes[domain, prototype_domain] = prototypes
        self.potentials_valid[domain, prototype_domain] = True
        return assignment

    @_outside_autocast
    def step_pseudo_labels(self, domain: int, rows) -> torch.Tensor:
        r"""One training step of ``domain``: pseudo-labels of bank ``rows``, then the prototype update.

        Exact (``refresh_every=1``, or a due refresh): :math:`P` = :meth:`assign`,
        labels :math:`\arg\max_k P_{nk}` for ``rows``, then
        :math:`C_d \leftarrow \mathrm{normalise}(P^\top M_d)`. Between refreshes: labels
        from the cached column potentials and :math:`C_d \leftarrow
        \mathrm{normalise}(\Sigma)` (class docstring), :math:`O(B K \cdot \text{dim})`.

        Args:
            domain: domain slot ``d``.
            rows: ``(B,)`` bank rows of the batch (already written by :meth:`fill`).

        Returns:
            ``(B,)`` long pseudo-labels in ``[0, K)``, computed before the update.

        Raises:
            TypeError: ``rows`` is not an integer sequence or tensor.
            ValueError: bad slot, ``rows`` not 1-D or outside ``[0, N_d)``, or the memory was never reclustered.

        Example:
            >>> import torch
            >>> from pml_protoot.memory import PrototypeMemory
            >>> memory = PrototypeMemory([0] * 4 + [1] * 4, dim=3, num_prototypes=2, kmeans_nredo=1, refresh_every=5)
            >>> memory.fill(torch.nn.functional.normalize(torch.randn(8, 3), dim=1), torch.arange(8))
            >>> memory.recluster(epoch=0)
            >>> memory.step_pseudo_labels(0, torch.tensor([0, 3])).shape, int(memory.refresh_countdown[0])
            (torch.Size([2]), 4)
        """
        domain = self._check_slot("domain", domain)
        self.check_ready()
        return self._step_pseudo_labels(domain, self.check_rows("rows", rows, domain))

    @_outside_autocast
    def _step_pseudo_labels(self, domain: int, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`step_pseudo_labels` of rows the memory made (``split_by_domain``): no checks, whose range
        read would wait for the GPU once per domain and step."""
        if self.refresh_every == 1:
            assignment = self.assign(domain)
            self._move_prototypes(domain, assignment)
            return assignment[rows].argmax(dim=1)
        if int(self.refresh_countdown[domain]) == 0:
            assignment = self._full_plan(domain, domain)
            labels = assignment[rows].argmax(dim=1)
            bank = self.bank(domain)
            self.prototype_means[domain] = _weighted_sums(assignment, bank) / len(bank)
            # Cross-domain plans of this bank are refreshed on their next use, with the new prototypes.
            self.potentials_valid[domain] = False
            self.potentials_valid[domain, domain] = True
            self.refresh_countdown[domain] = self.refresh_every - 1
        else:
            labels = self._plan_rows(domain, domain, self.bank(domain)[rows]).argmax(dim=1)
            self.refresh_countdown[domain] -= 1
        self.prototypes[domain] = F.normalize(self.prototype_means[domain], dim=1)
        return labels

    @_outside_autocast
    def cross_pseudo_labels(self, domain: int, prototype_domain: int, rows) -> torch.Tensor:
        r"""Pseudo-labels of bank ``rows`` of ``domain`` under ``prototype_domain``'s prototypes.

        :math:`\arg\max` of ``assign(domain, prototype_domain)`` rows; with
        ``refresh_every > 1`` the full OT runs only when no cached plan is valid (after
        ``domain``'s refresh or a :meth:`recluster`), otherwise rows come from its potentials.

        Returns:
            ``(B,)`` long pseudo-labels in ``[0, K)``.

        Raises:
            TypeError: ``rows`` is not an integer sequence or tensor.
            ValueError: bad slot, ``rows`` not 1-D or outside ``[0, N_d)``, or the memory was never reclustered.
        """
        domain = self._check_slot("domain", domain)
        prototype_domain = self._check_slot("prototype_domain", prototype_domain)
        self.check_ready()
        return self._cross_pseudo_labels(domain, prototype_domain, self.check_rows("rows", rows, domain))

    @_outside_autocast
    def _cross_pseudo_labels(self, domain: int, prototype_domain: int, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`cross_pseudo_labels` of rows the memory made, unchecked (see :meth:`_step_pseudo_labels`)."""
        if self._has_cached_plan(domain, prototype_domain):
            return self._plan_rows(domain, prototype_domain, self.bank(domain)[rows]).argmax(dim=1)
        return self._full_plan(domain, prototype_domain, rows).argmax(dim=1)

    def uses_ivf(self, domain: int) -> bool:
        """Whether :meth:`nearest_rows` searches bank ``domain`` through a :class:`BankIndex`."""
        if self.neighbour_search == "auto":
            # With refresh_every=1 every step solves the OT over the whole bank anyway: exact search adds
            # a few per cent there (measured at 100k-175k rows, K = 345), not worth approximate neighbours.
            return self.refresh_every > 1 and len(self.bank(domain)) >= AUTO_IVF_MIN_ROWS
        return self.neighbour_search == "ivf"

    @_outside_autocast
    def nearest_rows(self, domain: int, anchors: torch.Tensor, own_rows) -> torch.Tensor:
        r"""Bank rows most similar (dot product) to each anchor, never the anchor's own row.

        ``"exact"`` (or ``"auto"`` with ``refresh_every=1`` or below ``AUTO_IVF_MIN_ROWS`` rows): brute force,
        :math:`O(B N_d \cdot \text{dim})`. Otherwise the domain's :class:`BankIndex`
        (built at :meth:`recluster`, or here when missing, e.g. after
        ``load_state_dict``): exact for rows written since the build, approximate
        through IVF probing only, exact with ``ivf_nprobe >= nlist``.

        Args:
            domain: domain slot ``d``.
            anchors: ``(B, dim)`` floating tensor (keys or queries), no gradient needed.
            own_rows: ``(B,)`` bank rows of the anchors' own samples, excluded.

        Returns:
            ``(B,)`` long bank rows on the memory's device.

        Raises:
            TypeError: bad ``anchors`` or ``own_rows`` type.
            ValueError: bad slot, ``anchors`` not ``(B, dim)``, or ``own_rows`` not ``(B,)`` rows in ``[0, N_d)``.

        Example:
            >>> import torch
            >>> from pml_protoot.memory import PrototypeMemory
            >>> memory = PrototypeMemory([0] * 50 + [1] * 50, dim=4, num_prototypes=2, kmeans_nredo=1,
            ...                          neighbour_search="ivf", ivf_nlist=5, ivf_nprobe=5)
            >>> memory.fill(torch.nn.functional.normalize(torch.randn(100, 4), dim=1), torch.arange(100))
            >>> memory.recluster(epoch=0)
            >>> bank = memory.bank(0)
            >>> rows = memory.nearest_rows(0, bank[:2], torch.tensor([0, 1]))
            >>> bool((rows == (bank[:2] @ bank.T).fill_diagonal_(-2).argmax(dim=1)).all())
            True
        """
        domain = self._check_slot("domain", domain)
        check_matrix("anchors", anchors, cols=self.dim)
        own_rows = self.check_rows("own_rows", own_rows, domain)
        if len(own_rows) != len(anchors):
            raise ValueError(f"own_rows must hold one row per anchor ({len(anchors)}), got {len(own_rows)}")
        return self._nearest_rows(domain, anchors, own_rows)

    @_outside_autocast
    def _nearest_rows(self, domain: int, anchors: torch.Tensor, own_rows: torch.Tensor) -> torch.Tensor:
        """:meth:`nearest_rows` for checked anchors and rows the memory made, unchecked (two device reads
        fewer a domain and step: the anchors' finiteness and the rows' range)."""
        bank = self.bank(domain)
        anchors = anchors.detach()
        if not self.uses_ivf(domain):
            return exact_nearest_rows(anchors, bank, own_rows)
        if domain not in self._bank_indexes:
            self._bank_indexes[domain] = self._build_bank_index(domain)
        return self._bank_indexes[domain].search(anchors, own_rows, bank)

    def _build_bank_index(self, domain: int) -> "BankIndex":
        bank = self.bank(domain)
        nlist = min(self.ivf_nlist or max(1, round(math.sqrt(len(bank)))), len(bank))
        start = time.perf_counter()
        index = BankIndex(bank, nlist, min(self.ivf_nprobe, nlist), self.ivf_buffer_rows)
        logger.info("built IVF index of bank %d (%d rows, nlist %d) in %.1f s", domain, len(bank), nlist,
                    time.perf_counter() - start)
        return index

    def pseudo_labels(self, domain: int, prototype_domain: int | None = None) -> torch.Tensor:
        """Return the ``(N_d,)`` argmax over prototypes of :meth:`assign`."""
        return self.assign(domain, prototype_domain).argmax(dim=1)

    @_outside_autocast
    def update_prototypes(self, domain: int, assignment: torch.Tensor) -> None:
        r"""Set :math:`C_d \leftarrow \mathrm{normalise}(P^\top M_d)` (rows L2-normalised).

        Args:
            domain: domain slot ``d``.
            assignment: ``(N_d, K)`` soft assignment ``P``, e.g. from :meth:`assign`: entries
                ``>= 0``, not all 0 (a column without mass, as where :math:`\beta_k = 0`, leaves
                prototype ``k`` at 0 until an assignment gives it mass).

        Raises:
            TypeError: ``assignment`` is not a floating tensor.
            ValueError: bad slot, or ``assignment`` of the wrong shape, not finite, with a
                negative entry (raw scores, not an assignment) or no mass at all.
        """
        domain = self._check_slot("domain", domain)
        check_matrix("assignment", assignment, rows=len(self.bank(domain)), cols=self.num_prototypes)
        if bool((assignment < 0).any() | (assignment.sum() == 0)):
            raise ValueError(
                f"assignment must be a soft assignment (entries >= 0, not all 0), got entries in "
                f"[{float(assignment.min()):.3g}, {float(assignment.max()):.3g}]"
            )
        self._move_prototypes(domain, assignment)

    @_outside_autocast
    def _move_prototypes(self, domain: int, assignment: torch.Tensor) -> None:
        """:meth:`update_prototypes` without its checks, for Sinkhorn's plans (each check syncs with the
        device, and training runs this for every domain every step)."""
        self.prototypes[domain] = F.normalize(_weighted_sums(assignment, self.bank(domain)), dim=1)

    @_outside_autocast
    def recluster(self, epoch: int) -> None:
        """Run faiss K-means on every bank; set class marginals and (first call, or reset) prototypes.

        Call at the start of every epoch. The first call (``epoch`` buffer still -1)
        sets every :math:`C_d` to the L2-normalised centroids; every call sets
        :math:`\\beta_d` by ``marginal_rule`` (see the class docstring) and stores ``epoch``;
        with ``reset_prototypes``, later calls then set :math:`C_d` to the centroids in
        prototype order (centroid matched to prototype by maximum-cosine Hungarian
        assignment), after the marginals were computed against the previous prototypes.

        Args:
            epoch: current epoch, a non-negative int (drives the loss's cross-domain schedule).

        Raises:
            ValueError: negative ``epoch`` or a bank row never written by :meth:`fill`.
        """
        epoch = check_non_negative_int("epoch", epoch)
        if not bool(self.written.all()):
            missing = int((~self.written).sum())
            raise ValueError(
                f"memory must be filled before recluster: {missing} of {self.num_samples} indices were never "
                "written by memory.fill(keys, indices)"
            )
        first = int(self.epoch) < 0
        # After the first call, K-means only feeds the cluster-size marginals and the reset.
        needs_kmeans = first or self.reset_prototypes or self.marginal_rule in CLUSTER_SIZE_RULES
        clusterings = self._kmeans_on_rank_zero(epoch) if needs_kmeans else None
        if first:
            for slot, (centroids, _) in enumerate(clusterings):
                self.prototypes[slot] = F.normalize(centroids, dim=1)
        self.epoch.fill_(epoch)  # before the marginals: the "assignment" rule calls assign()
        for slot in range(self.num_domains):
            if clusterings is None:
                self.class_marginals[slot] = self._class_marginal(slot)
                continue
            centroids, sizes = clusterings[slot]
            # One matching serves the "matched" marginal and the reset; both use the prototypes before it.
            cluster_of_prototype = self._cluster_of_prototype(slot, centroids)
            self.class_marginals[slot] = self._class_marginal(slot, sizes, cluster_of_prototype)
            if self.reset_prototypes and not first:
                self.prototypes[slot] = F.normalize(centroids[cluster_of_prototype], dim=1)
        if self.refresh_every > 1:  # new marginals (and maybe prototypes): every cached plan is stale
            self.refresh_countdown.zero_()
            self.potentials_valid.zero_()
        self._bank_indexes = {slot: self._build_bank_index(slot) for slot in range(self.num_domains)
                              if self.uses_ivf(slot)}
        if clusterings is None:  # every epoch but the first, with the default options: not worth an INFO line
            logger.debug("epoch %d: class marginals by rule %r, prototypes kept (no K-means)", epoch, self.marginal_rule)
        else:
            did = "set the prototypes" if first else "reset the prototypes" if self.reset_prototypes else "kept them"
            logger.info("K-means on %d domains at epoch %d: marginals by rule %r, %s", self.num_domains, epoch,
                        self.marginal_rule, did)

    def _kmeans_on_rank_zero(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K-means of every bank on rank 0, broadcast to the other ranks (one process: just K-means)."""
        clusterings = []
        for slot in progress_bar(range(self.num_domains), f"K-means (epoch {epoch})", leave=False):
            if get_rank() == 0:
                centroids, sizes = self._kmeans(self.bank(slot))
            else:
                centroids = torch.empty_like(self.prototypes[slot])
                sizes = torch.empty(self.num_prototypes, device=centroids.device, dtype=torch.long)
            broadcast_(centroids)  # no-op on one process
            broadcast_(sizes)
            clusterings.append((centroids, sizes))
        return clusterings

    def _kmeans(self, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return K-means ``(K, dim)`` centroids like ``bank`` and ``(K,)`` int64 cluster sizes on its device."""
        points = _as_faiss_rows(bank)
        kmeans = faiss.Kmeans(
            self.dim,
            self.num_prototypes,
            niter=self.kmeans_niter,
            nredo=self.kmeans_nredo,
            seed=self.kmeans_seed,
            verbose=False,
            min_points_per_centroid=1,  # only silences faiss's "too few points" warning
            max_points_per_centroid=2000,  # as the official code: faiss's default 256 subsamples larger banks
        )
        kmeans.train(points)
        _, labels = kmeans.index.search(points, 1)
        sizes = np.bincount(labels.ravel(), minlength=self.num_prototypes)
        # Counts stay integers: in a float16 bank's dtype they overflow past 65,504 rows.
        centroids = torch.from_numpy(kmeans.centroids).to(device=bank.device, dtype=bank.dtype)
        return centroids, torch.from_numpy(sizes).to(device=bank.device, dtype=torch.long)

    def _class_marginal(self, slot: int, sizes=None, cluster_of_prototype=None) -> torch.Tensor:
        """``(K,)`` marginal of ``slot`` by ``marginal_rule``; the cluster-size rules need ``sizes``
        (cluster order) and, for ``"matched"``, ``cluster_of_prototype``."""
        if self.marginal_rule == "uniform":
            return torch.full_like(self.class_marginals[slot], 1.0 / self.num_prototypes)
        if self.marginal_rule == "assignment":
            return self.assign(slot).sum(dim=0) / len(self.bank(slot))
        fractions = sizes.cpu().double() / int(sizes.sum())  # float64 on the CPU: any device's memory
        if self.marginal_rule == "matched":
            fractions = fractions[cluster_of_prototype.cpu()]
        return fractions.to(self.class_marginals)

    def _cluster_of_prototype(self, slot: int, centroids: torch.Tensor) -> torch.Tensor:
        """``(K,)`` long: the K-means cluster matched to each current prototype of ``slot``
        (maximum total cosine similarity, Hungarian); index cluster-ordered tensors with it."""
        similarity = F.normalize(centroids, dim=1) @ self.prototypes[slot].T  # (cluster, prototype)
        clusters, prototypes = linear_sum_assignment(similarity.cpu().double().numpy(), maximize=True)
        order = torch.empty(self.num_prototypes, dtype=torch.long)
        order[torch.as_tensor(prototypes)] = torch.as_tensor(clusters)
        return order.to(centroids.device)

    def extra_repr(self) -> str:
        return (
            f"num_domains={self.num_domains}, dim={self.dim}, num_prototypes={self.num_prototypes}, "
            f"epsilon={self.epsilon}, sinkhorn_iterations={self.sinkhorn_iterations}, "
            f"normalize_scores={self.normalize_scores}, marginal_rule={self.marginal_rule!r}, "
            f"reset_prototypes={self.reset_prototypes}, "
            f"refresh_every={self.refresh_every}, neighbour_search={self.neighbour_search!r}"
        )


def check_memory_to_train(memory, user: str) -> None:
    """Raise unless ``memory`` is a :class:`PrototypeMemory` with at least two prototypes per domain.

    ``user`` (``"ProtoOTLoss"``, ``"ProtoOTMiner"``) compares samples through their prototypes: with
    one prototype every sample is assigned to it, so every softmax is over one entry (loss and
    gradient exactly 0) and no pair is a negative.
    """
    if not isinstance(memory, PrototypeMemory):
        raise TypeError(f"memory must be a PrototypeMemory, got {type(memory).__name__}")
    if memory.num_prototypes < 2:
        raise ValueError(
            f"{user} needs a memory with at least 2 prototypes per domain, got num_prototypes="
            f"{memory.num_prototypes}: with one, every sample is assigned to it and there is nothing to learn"
        )


def warn_if_class_labels(memory: PrototypeMemory, name: str, indices: torch.Tensor) -> bool:
    """Warn (at the user's line) when one batch's ``indices`` look like class labels, not sample indices.

    PML's usual labels are class labels; ProtoOT's are global sample indices, and class labels would
    silently address the memory's first samples. With domains stored one after another (as
    :class:`MultiDomainImageFolder` stores them), class labels 0..C-1 all lie in the first half of
    the leading run of sample 0's domain (it holds several images of every class), and they repeat
    unevenly. Sample indices of any sampler spread over the dataset: a batch of them stays below that
    bound only by chance (:math:`2^{-B}` for a domain's own uniform batch). So the warning needs all
    of: a batch of at least 32 (samplers with replacement repeat a small batch's indices by chance),
    every value below half that leading run, a value that occurs more than twice (two views
    concatenated hold each index twice), and counts that differ (a sequential sampler's first batch,
    concatenated over any number of views, holds each index equally often). It misses class labels
    in a batch that holds every class equally often (PML's ``MPerClassSampler``) or none more than
    twice, and with domains interleaved in index order. Callers run it until it returns True: once
    on a batch large enough to judge (it reads the device then).

    Args:
        memory: the memory the indices address.
        name: the argument named in the warning.
        indices: ``(B,)`` long tensor, checked to lie in ``[0, memory.num_samples)``.

    Returns:
        Whether the batch was judged (at least 32 indices), warned of or not.
    """
    if len(indices) < 32:
        return False
    other_domain = torch.nonzero(memory.domain_of != memory.domain_of[0])
    limit = (int(other_domain[0, 0]) if len(other_domain) else memory.num_samples) // 2  # half the leading run
    distinct, counts = torch.unique(indices, return_counts=True)  # sorted
    most = int(counts.max())
    if int(distinct[-1]) >= limit or most <= 2 or int(counts.min()) == most:
        return True
    warnings.warn(
        f"{name} look like class labels: every value is below {limit} (half of the first domain's leading run) and "
        f"{int(distinct[counts.argmax()])} occurs {most} times in one batch; ProtoOT's labels are global "
        "sample indices (the second item of TwoViewDataset), one per sample (twice for two views)",
        UserWarning,
        stacklevel=caller_stacklevel(),
    )
    return True


def _cast_finite(name: str, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return ``values`` cast to ``dtype``, raising ``ValueError`` if the cast makes an entry non-finite.

    A finite float32 value past a narrower dtype's range (float16: 65,504) becomes inf,
    which would silently poison K-means and the OT. Casts that cannot overflow cost nothing
    here; the others one pass and one device sync over ``values``.
    """
    cast = values.to(dtype)
    if not values.is_floating_point() or torch.finfo(values.dtype).max <= torch.finfo(dtype).max:
        return cast
    overflow = ~torch.isfinite(cast) & torch.isfinite(values)
    if overflow.any():
        limit = torch.finfo(dtype).max
        raise ValueError(
            f"{name} must be finite in the memory's dtype {dtype} (|x| <= {limit:.6g}), got {int(overflow.sum())} "
            f"entries past it, largest |x| {values[overflow].abs().max().item():.4g}: scale the keys or use a "
            "wider memory dtype (memory.float())"
        )
    return cast


def _scores(rows: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` scores of ``(N, dim)`` rows against ``(K, dim)`` prototypes in float32 at least: the full
    OT's bank and the cached plan's batch are scored alike, so that cached labels of unchanged rows are
    the full plan's. Half-precision rows are upcast :data:`SCORE_CHUNK_ROWS` at a time (a bounded temporary)."""
    dtype = compute_dtype(rows)
    prototypes = prototypes.to(dtype)
    if rows.dtype == dtype:
        return rows @ prototypes.T
    return torch.cat([chunk.to(dtype) @ prototypes.T for chunk in rows.split(SCORE_CHUNK_ROWS)])


def _weighted_sums(assignment: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    r"""``(K, dim)`` :math:`P^\top M` of an ``(N, K)`` assignment and ``(N, dim)`` bank, on the bank's device.

    Accumulated in float32 at least (float64 stays float64): a float16 sum of a large
    cluster overflows past 65,504, and normalising that gives NaN prototypes.
    """
    dtype = compute_dtype(bank)
    return assignment.detach().to(device=bank.device, dtype=dtype).T @ bank.to(dtype)


class BankIndex:
    r"""Approximate inner-product search over one bank: a faiss IVF plus an exact side buffer.

    At construction the bank's rows go into a faiss ``IndexIVFFlat`` (inner product,
    ``nlist`` lists trained by K-means on a subsample, rows stored in float32 on the
    CPU). Rows written afterwards (:meth:`mark_written`) leave the IVF and wait in a
    *pending* buffer that is searched exactly against the current bank; when the buffer
    holds more than ``buffer_rows`` rows, all but the newest batch go back into the IVF
    with their current values. So every search is exact for rows changed since the
    build and approximate only through IVF probing (``nprobe`` of ``nlist`` lists;
    ``nprobe = nlist`` is exhaustive, hence exact). Per call, :meth:`search` costs
    :math:`O(B\,(\text{nlist} + \text{nprobe}\,N/\text{nlist} + \text{buffer}) \cdot \text{dim})`
    and :meth:`mark_written` :math:`O(B)` plus, once every ``buffer_rows / B`` calls, a
    flush of :math:`O(\text{buffer} \cdot \text{nlist} \cdot \text{dim})`: never a pass
    over the whole bank. Building costs one K-means of ``nlist`` centroids on
    ``64 nlist`` rows plus :math:`O(N\,\text{nlist}\cdot\text{dim})` to file the rows
    (about 9 s for :math:`N = 10^6`, ``dim`` 128, ``nlist`` 1000 on one CPU thread).

    Args:
        bank: ``(N, dim)`` floating tensor (any device or dtype; copied to float32 CPU).
        nlist: number of IVF lists, in ``[1, N]``.
        nprobe: lists searched per query, in ``[1, nlist]``.
        buffer_rows: pending rows kept before a flush into the IVF.

    Example:
        >>> import torch
        >>> from pml_protoot.memory import BankIndex
        >>> bank = torch.nn.functional.normalize(torch.randn(100, 8), dim=1)
        >>> index = BankIndex(bank, nlist=4, nprobe=4, buffer_rows=16)
        >>> rows = index.search(bank[:3], torch.tensor([0, 1, 2]), bank)
        >>> bool((rows == (bank[:3] @ bank.T).fill_diagonal_(-2).argmax(dim=1)).all())
        True
    """

    #: K-means training rows per IVF list (faiss subsamples the bank to this many).
    TRAINING_ROWS_PER_LIST = 64

    def __init__(self, bank: torch.Tensor, nlist: int, nprobe: int, buffer_rows: int):
        num_rows, dim = bank.shape
        if not 1 <= check_positive_int("nlist", nlist) <= num_rows:
            raise ValueError(f"nlist must be at most the bank's {num_rows} rows, got {nlist}")
        if not 1 <= check_positive_int("nprobe", nprobe) <= nlist:
            raise ValueError(f"nprobe must be at most nlist ({nlist}), got {nprobe}")
        self.buffer_rows = check_positive_int("buffer_rows", buffer_rows)
        self._quantizer = faiss.IndexFlatIP(dim)  # the IVF keeps a pointer: keep it alive
        self.index = faiss.IndexIVFFlat(self._quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.max_points_per_centroid = self.TRAINING_ROWS_PER_LIST
        self.index.cp.min_points_per_centroid = 1  # only silences faiss's "too few points" warning
        self.index.cp.seed = 0
        self.index.nprobe = nprobe
        vectors = _as_faiss_rows(bank)
        self.index.train(vectors)
        self.index.set_direct_map_type(faiss.DirectMap.Hashtable)  # removal by id in O(1) per row
        self.index.add_with_ids(vectors, np.arange(num_rows, dtype=np.int64))
        self.pending = torch.zeros(0, dtype=torch.long)

    def __getstate__(self) -> dict:
        """Pickle the IVF as faiss's own serialisation: lists, direct map and ``nprobe`` exactly as they are,
        so an unpickled index (and memory) returns the same neighbours; rebuilding would not (K-means, flushes)."""
        state = {name: value for name, value in self.__dict__.items() if name != "_quantizer"}
        state["index"] = faiss.serialize_index(self.index)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.index = faiss.deserialize_index(state["index"])
        self._quantizer = None  # the deserialised IVF owns its copy of the quantizer

    def mark_written(self, rows: torch.Tensor, bank: torch.Tensor) -> None:
        """Move ``rows`` (just written into ``bank``) out of the IVF into the exact pending buffer."""
        rows = rows.cpu()
        new_rows = torch.unique(rows[~torch.isin(rows, self.pending)])
        if len(new_rows):
            ids = np.ascontiguousarray(new_rows.numpy(), dtype=np.int64)
            self.index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)))
        self.pending = torch.cat([self.pending, new_rows])
        if len(self.pending) > self.buffer_rows:
            # The newest rows stay pending, so a batch's own rows are always searched exactly.
            settled = self.pending[~torch.isin(self.pending, rows)]
            self.index.add_with_ids(_as_faiss_rows(bank[settled.to(bank.device)]), settled.numpy())
            self.pending = torch.unique(rows)

    def search(self, anchors: torch.Tensor, own_rows: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """Return the ``(B,)`` rows of ``bank`` with the largest dot product to each anchor, never its own row.

        ``own_rows`` are marked written first, so they are searched exactly (and excluded
        exactly); an anchor for which the probed lists and the buffer hold no other row
        falls back to an exact search.
        """
        if not len(anchors):
            return own_rows.new_zeros(0)
        self.mark_written(own_rows, bank)
        ivf_scores, ivf_rows = self.index.search(_as_faiss_rows(anchors), 1)
        best_scores = torch.from_numpy(ivf_scores[:, 0]).double()
        best_rows = torch.from_numpy(ivf_rows[:, 0])
        best_scores[best_rows < 0] = -math.inf  # faiss's "nothing in the probed lists"
        pending = self.pending.to(bank.device)
        dtype = torch.promote_types(anchors.dtype, bank.dtype)
        pending_scores = anchors.to(dtype) @ bank[pending].to(dtype).T
        pending_scores[pending[None, :] == own_rows.to(bank.device)[:, None]] = -math.inf
        pending_best_scores, pending_best = pending_scores.max(dim=1)
        take_pending = pending_best_scores.cpu().double() > best_scores
        best_scores = torch.where(take_pending, pending_best_scores.cpu().double(), best_scores)
        best_rows = torch.where(take_pending, self.pending[pending_best.cpu()], best_rows).to(own_rows.device)
        missing = ~torch.isfinite(best_scores).to(own_rows.device)
        if missing.any():
            best_rows[missing] = exact_nearest_rows(anchors[missing], bank, own_rows[missing])
        return best_rows


def _as_faiss_rows(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 numpy copy of a 2-D tensor (what faiss accepts)."""
    return np.ascontiguousarray(tensor.detach().to(device="cpu", dtype=torch.float32).numpy())


def exact_nearest_rows(anchors: torch.Tensor, bank: torch.Tensor, own_rows: torch.Tensor) -> torch.Tensor:
    r"""Brute-force :math:`\arg\max_{r \ne \text{own}} a \cdot M_r`: ``(B,)`` bank rows for ``(B, dim)`` anchors.

    One ``(B, N)`` similarity matrix in the promoted dtype of ``anchors`` and ``bank``.
    """
    dtype = torch.promote_types(anchors.dtype, bank.dtype)
    similarity = anchors.to(dtype) @ bank.to(dtype).T
    similarity[torch.arange(len(anchors), device=similarity.device), own_rows.to(similarity.device)] = -math.inf
    # max's indices are argmax's (the first of ties), 2.5-3x faster over a CPU bank's (B, N) scores
    return similarity.max(dim=1).indices.to(own_rows.device)
