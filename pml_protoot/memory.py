"""Per-domain memory banks, prototypes and class marginals (ProtoOT's state between steps)."""
from __future__ import annotations

import logging

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from ._checks import as_index_tensor, check_choice, check_in_range, check_matrix, check_positive_int
from .ot import sinkhorn

__all__ = ["PrototypeMemory", "MARGINAL_RULES"]

logger = logging.getLogger(__name__)

#: Ways ``PrototypeMemory.recluster`` can set the class marginals (see its docstring).
MARGINAL_RULES = ("official", "matched", "assignment", "uniform")


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
    * :meth:`recluster`: faiss K-means per bank; the first call sets :math:`C_d` to the
      L2-normalised centroids, every call sets :math:`\beta_d` by ``marginal_rule``.

    Banks, prototypes, marginals, the ``written`` mask and ``epoch`` are buffers, so
    ``state_dict()``/``load_state_dict()`` round-trip exactly and ``.to()`` moves all.

    Args:
        domains: ``(N,)`` integer sequence or tensor, the domain id of every global
            sample index; at least two distinct ids.
        dim: embedding size of the stored keys.
        num_prototypes: ``K``, prototypes per domain; at most the size of the smallest domain.
        epsilon: Sinkhorn entropic regularisation (0.05 in ProtoOT).
        sinkhorn_iterations: Sinkhorn rounds (3 in ProtoOT).
        normalize_scores: L2-normalise each row of :math:`M_d C^\top` before Sinkhorn,
            as the official code does (``False`` by default: raw cosine similarities).
        marginal_rule: how :meth:`recluster` sets :math:`\beta_d`: ``"official"``
            (K-means cluster sizes in K-means order: the original code, mis-ordered
            after the first epoch), ``"matched"`` (cluster sizes reordered to the
            current prototypes by Hungarian matching of centroid-prototype cosine
            similarity; default), ``"assignment"`` (column sums of the current
            :meth:`assign` divided by :math:`N_d`) or ``"uniform"`` (:math:`1/K`).
        kmeans_niter: K-means iterations per run (50 in ProtoOT).
        kmeans_nredo: K-means restarts, the best kept (20 in ProtoOT).
        kmeans_seed: K-means random seed (0 in ProtoOT).

    Raises:
        TypeError: ``domains`` is not an integer sequence.
        ValueError: fewer than two domains, a domain with fewer than two samples
            (a nearest neighbour other than the sample itself must exist), more
            prototypes than samples in a domain, or a bad option value.

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
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        normalize_scores: bool = False,
        marginal_rule: str = "matched",
        kmeans_niter: int = 50,
        kmeans_nredo: int = 20,
        kmeans_seed: int = 0,
    ):
        super().__init__()
        domains = as_index_tensor("domains", domains, device="cpu")
        self.dim = check_positive_int("dim", dim)
        self.num_prototypes = check_positive_int("num_prototypes", num_prototypes)
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        self.epsilon = float(epsilon)
        self.sinkhorn_iterations = check_positive_int("sinkhorn_iterations", sinkhorn_iterations)
        self.normalize_scores = bool(normalize_scores)
        check_choice("marginal_rule", marginal_rule, MARGINAL_RULES)
        self.marginal_rule = marginal_rule
        self.kmeans_niter = check_positive_int("kmeans_niter", kmeans_niter)
        self.kmeans_nredo = check_positive_int("kmeans_nredo", kmeans_nredo)
        if isinstance(kmeans_seed, bool) or not isinstance(kmeans_seed, int):
            raise TypeError(f"kmeans_seed must be an int, got {type(kmeans_seed).__name__}")
        self.kmeans_seed = kmeans_seed

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
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.num_domains:
            raise ValueError(f"{name} must be a domain slot in [0, {self.num_domains}), got {slot!r}")
        return int(slot)

    def check_indices(self, name: str, indices) -> torch.Tensor:
        """Return ``indices`` as a 1-D long tensor on the memory's device, or raise naming ``name``."""
        indices = as_index_tensor(name, indices, device=self.domain_of.device)
        check_in_range(name, indices, self.num_samples)
        return indices

    def split_by_domain(self, indices) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Group a batch of global indices by domain.

        Args:
            indices: ``(B,)`` global sample indices.

        Returns:
            For each domain present, in slot order: ``(slot, positions, rows)`` where
            ``positions`` are the batch positions of its samples and ``rows`` their bank rows.
        """
        indices = self.check_indices("indices", indices)
        slots = self.domain_of[indices]
        groups = []
        for slot in torch.unique(slots).tolist():
            positions = torch.nonzero(slots == slot).flatten()
            groups.append((slot, positions, self.row_of[indices[positions]]))
        return groups

    def fill(self, keys: torch.Tensor, indices) -> None:
        """Write ``keys`` (detached, cast to the bank dtype, otherwise as given) into their bank rows.

        Args:
            keys: ``(B, dim)`` finite floating tensor, e.g. L2-normalised momentum-encoder keys.
            indices: ``(B,)`` global sample indices; for a repeated index the last key wins.

        Raises:
            TypeError, ValueError: bad ``keys`` or ``indices``; nothing is written then.
        """
        indices = self.check_indices("indices", indices)
        check_matrix("keys", keys, rows=len(indices), cols=self.dim)
        keys = keys.detach()
        is_last = self._last_occurrence(indices)
        indices, keys = indices[is_last], keys[is_last.to(keys.device)]
        for slot, positions, rows in self.split_by_domain(indices):
            bank = self.bank(slot)
            bank[rows] = keys[positions.to(keys.device)].to(device=bank.device, dtype=bank.dtype)
        self.written[indices] = True

    @staticmethod
    def _last_occurrence(indices: torch.Tensor) -> torch.Tensor:
        """Mask of the positions holding the last occurrence of each index (deterministic writes)."""
        positions = torch.arange(len(indices), device=indices.device)
        last = torch.full((int(indices.max()) + 1 if len(indices) else 0,), -1, device=indices.device)
        last = last.scatter_reduce(0, indices, positions, reduce="amax")
        return last[indices] == positions

    def check_ready(self) -> None:
        """Raise ``ValueError`` unless :meth:`recluster` has set the prototypes."""
        if int(self.epoch) < 0:
            raise ValueError(
                "memory must be filled and reclustered before use (call memory.fill(keys, indices) for every "
                "sample, then memory.recluster(epoch)); got a memory that was never reclustered"
            )

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
        scores = self.bank(domain) @ self.prototypes[prototype_domain].T
        return sinkhorn(
            scores,
            self.class_marginals[domain],
            self.epsilon,
            self.sinkhorn_iterations,
            normalize_scores=self.normalize_scores,
        )

    def pseudo_labels(self, domain: int, prototype_domain: int | None = None) -> torch.Tensor:
        """Return the ``(N_d,)`` argmax over prototypes of :meth:`assign`."""
        return self.assign(domain, prototype_domain).argmax(dim=1)

    def update_prototypes(self, domain: int, assignment: torch.Tensor) -> None:
        r"""Set :math:`C_d \leftarrow \mathrm{normalise}(P^\top M_d)` (rows L2-normalised).

        Args:
            domain: domain slot ``d``.
            assignment: ``(N_d, K)`` soft assignment ``P``, e.g. from :meth:`assign`.
        """
        domain = self._check_slot("domain", domain)
        bank = self.bank(domain)
        check_matrix("assignment", assignment, rows=len(bank), cols=self.num_prototypes)
        weighted_means = assignment.detach().to(device=bank.device, dtype=bank.dtype).T @ bank
        self.prototypes[domain] = F.normalize(weighted_means, dim=1)

    def recluster(self, epoch: int) -> None:
        """Run faiss K-means on every bank; set prototypes (first call) and class marginals.

        Call at the start of every epoch. The first call (``epoch`` buffer still -1)
        sets every :math:`C_d` to the L2-normalised centroids; every call sets
        :math:`\\beta_d` by ``marginal_rule`` (see the class docstring) and stores ``epoch``.

        Args:
            epoch: current epoch, a non-negative int (drives the loss's cross-domain schedule).

        Raises:
            ValueError: negative ``epoch`` or a bank row never written by :meth:`fill`.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if not bool(self.written.all()):
            missing = int((~self.written).sum())
            raise ValueError(
                f"memory must be filled before recluster: {missing} of {self.num_samples} indices were never "
                "written by memory.fill(keys, indices)"
            )
        slots = tqdm(range(self.num_domains), desc=f"K-means (epoch {epoch})", leave=False, disable=None)
        clusterings = [self._kmeans(self.bank(slot)) for slot in slots]
        if int(self.epoch) < 0:
            for slot, (centroids, _) in enumerate(clusterings):
                self.prototypes[slot] = F.normalize(centroids, dim=1)
        self.epoch.fill_(epoch)  # before the marginals: the "assignment" rule calls assign()
        for slot, (centroids, sizes) in enumerate(clusterings):
            self.class_marginals[slot] = self._class_marginal(slot, centroids, sizes)
        logger.info("reclustered %d domains at epoch %d (marginal rule %r)", self.num_domains, epoch, self.marginal_rule)

    def _kmeans(self, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return K-means ``(K, dim)`` centroids and ``(K,)`` cluster sizes, as tensors like ``bank``."""
        points = np.ascontiguousarray(bank.detach().cpu().numpy(), dtype=np.float32)
        kmeans = faiss.Kmeans(
            self.dim,
            self.num_prototypes,
            niter=self.kmeans_niter,
            nredo=self.kmeans_nredo,
            seed=self.kmeans_seed,
            verbose=False,
            min_points_per_centroid=1,  # only silences faiss's "too few points" warning
        )
        kmeans.train(points)
        _, labels = kmeans.index.search(points, 1)
        sizes = np.bincount(labels.ravel(), minlength=self.num_prototypes)
        as_bank = dict(device=bank.device, dtype=bank.dtype)
        return torch.from_numpy(kmeans.centroids).to(**as_bank), torch.from_numpy(sizes).to(**as_bank)

    def _class_marginal(self, slot: int, centroids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        fractions = sizes / sizes.sum()
        if self.marginal_rule == "official":
            return fractions
        if self.marginal_rule == "matched":
            return self._match_to_prototypes(slot, centroids, fractions)
        if self.marginal_rule == "assignment":
            return self.assign(slot).sum(dim=0) / len(self.bank(slot))
        return torch.full_like(fractions, 1.0 / self.num_prototypes)

    def _match_to_prototypes(self, slot: int, centroids: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
        """Reorder cluster fractions to prototype order by maximum-cosine Hungarian matching."""
        similarity = F.normalize(centroids, dim=1) @ self.prototypes[slot].T  # (cluster, prototype)
        clusters, prototypes = linear_sum_assignment(similarity.cpu().double().numpy(), maximize=True)
        matched = torch.empty_like(fractions)
        matched[torch.as_tensor(prototypes, device=matched.device)] = fractions[
            torch.as_tensor(clusters, device=matched.device)
        ]
        return matched

    def extra_repr(self) -> str:
        return (
            f"num_domains={self.num_domains}, dim={self.dim}, num_prototypes={self.num_prototypes}, "
            f"epsilon={self.epsilon}, sinkhorn_iterations={self.sinkhorn_iterations}, "
            f"normalize_scores={self.normalize_scores}, marginal_rule={self.marginal_rule!r}"
        )
