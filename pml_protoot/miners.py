"""OT pseudo-label mining: ProtoOT's prototype assignments as pairs/triplets for any PML loss."""
from __future__ import annotations

import warnings

import torch
from pytorch_metric_learning.miners import BaseMiner

from ._checks import as_index_tensor, caller_stacklevel, check_bool, check_choice
from .memory import check_memory_to_train, warn_if_class_labels

__all__ = ["ProtoOTMiner"]


class ProtoOTMiner(BaseMiner):
    r"""Mine pairs or triplets from the OT pseudo-labels of a :class:`PrototypeMemory`.

    ``labels`` (and ``ref_labels``) are *global sample indices*, never class labels: the
    miner looks every sample up in the memory and reads its pseudo-labels there, so a
    PML loss such as ``NTXentLoss`` or ``MultiSimilarityLoss`` trains without labels.

    For a sample :math:`i` of domain :math:`a` with bank row :math:`r_i`, let
    :math:`y_i = \arg\max_k P_a[r_i, k]` be its own-domain pseudo-label (OT of bank
    :math:`a` onto prototypes of :math:`a`) and :math:`x_i^{b}` its label under the OT
    of bank :math:`a` onto the prototypes of another domain :math:`b`
    (``memory.pseudo_labels(a, prototype_domain=b)``); set :math:`x_i^{a} = y_i`.
    A pair :math:`(i, j)` with :math:`j` in domain :math:`b` agrees *from i's side* when
    :math:`x_i^{b} = y_j` and *from j's side* when :math:`x_j^{a} = y_i`. Then

    * negative  iff neither side agrees,
    * left out  when exactly one side agrees (ambiguous: prototypes of different domains
      need not correspond one to one),
    * when both sides agree (mutual agreement): positive with ``positives="agreement"``;
      left out with ``positives="instance"``, where the only positives are two views of
      one sample (equal global index, e.g. a query and its momentum key).

    Within a domain both sides reduce to :math:`y_i = y_j`. Across domains mutual
    agreement means :math:`i`'s nearest prototype of domain :math:`b` is the one
    :math:`j` belongs to, and vice versa. With ``cross_domain=False`` only same-domain
    pairs are mined.

    ``"instance"`` (the default) is instance contrast whose negatives skip every pair the
    OT pseudo-labels call same-class, so likely class-mates are never pushed apart. It is
    the default because it measured best on pacs-mini (``benchmarks/accuracy.py``, mean P@15
    over 8 directions, 3 seeds): ``NTXentLoss`` with this miner scored 57.8 at 60 epochs,
    against 31.5 for the same loss without it (and without the centring and PCA-started head
    of the miner's run; 34.4 on centred features at 30 epochs); at 30 epochs
    ``MultiSimilarityLoss`` with the miner scored 54.1 with ``"instance"`` against 52.5 with
    ``"agreement"``, whose pseudo-label positives (many of them wrong early in training) pull
    different classes together, with about four times its seed spread.

    Without ``ref_emb`` an embedding is never its own positive (PML's convention: the
    diagonal is left out; two views concatenated with equal indices do pair up). With
    ``ref_emb`` (e.g. momentum keys, ``ref_labels`` = the same global indices, or ``None``
    for "the same as ``labels``", as ``ProtoOTLoss`` takes it) the pair (query :math:`i`,
    key :math:`i`) is always a positive. Whether the diagonal is left out follows from
    ``ref_emb is embeddings``, not from ``ref_labels is labels`` as in PML: PML's own
    miners leave (query :math:`i`, key :math:`i`) out when ``ref_labels`` is ``None``. With
    ``positives="instance"`` and no index shared by anchors and references there are no
    positives: a ``UserWarning`` says so. The first call with 32 ``labels`` or more also warns
    when they look like class labels, not sample indices (``ProtoOTLoss``'s rule).

    Args:
        memory: the :class:`~pml_protoot.memory.PrototypeMemory` holding banks and
            prototypes; the caller writes the batch keys into it (``memory.fill``) first.
        positives: ``"instance"`` (two views of one sample only) or ``"agreement"``
            (also every mutually agreeing pair).
        cross_domain: also mine pairs whose members come from different domains. With
            ``positives="instance"`` those pairs can only be negatives, and they rest on the
            OT's matching of the domains' prototypes: where it is wrong they push class-mates
            apart. ``False`` measured more stable on pacs-mini (``NTXentLoss``, 60 epochs:
            photo→sketch P@15 56.0 ± 1.0 over 10 seeds against 37.0 ± 6.9) at a lower mean
            mAP (54.6 against 55.8 over the 8 paired directions).
        type_of_tuple: ``"pairs"`` returns ``(a1, p, a2, n)``; ``"triplets"`` returns
            every ``(a, p, n)`` with ``(a, p)`` positive and ``(a, n)`` negative.
        update_prototypes: after the assignments, move every involved domain's
            prototypes to the assignment-weighted bank means
            (``memory.update_prototypes``), as ``ProtoOTLoss`` does each step; set it
            when the miner drives training with a plain PML loss (``ProtoOTTrainer`` warns
            when nothing would move them: this miner without it, on a memory without
            ``reset_prototypes``). Under
            ``torch.distributed`` it then steps every domain of the global batch, also
            those this rank's batch lacks: a collective, called by every rank every step.
            The miner then steps the memory as ``ProtoOTLoss`` does, so a memory's
            ``refresh_every > 1`` labels from its cached plans between refreshes; without
            ``update_prototypes`` every label comes from an exact plan, every step.
        **kwargs: passed to PML's ``BaseMiner`` (e.g. ``distance``; unused for mining).

    Raises:
        TypeError: ``memory`` is not a ``PrototypeMemory``, ``labels`` / ``ref_labels`` are not
            integer sequences or tensors, or an option of the wrong type (a string for a flag).
        ValueError: a memory with one prototype per domain, bad ``positives`` or
            ``type_of_tuple``, indices outside the memory, ``ref_labels=None`` with a
            ``ref_emb`` of another length than ``labels``, or ``ref_emb is embeddings``
            with ``ref_labels`` other than ``labels``.

    Example:
        >>> import torch
        >>> from pytorch_metric_learning.losses import NTXentLoss
        >>> from pml_protoot.memory import PrototypeMemory
        >>> from pml_protoot.miners import ProtoOTMiner
        >>> _ = torch.manual_seed(0)
        >>> domains = torch.tensor([0] * 8 + [1] * 8)
        >>> memory = PrototypeMemory(domains, dim=4, num_prototypes=2, kmeans_nredo=1)
        >>> memory.fill(torch.nn.functional.normalize(torch.randn(16, 4), dim=1), torch.arange(16))
        >>> memory.recluster(0)
        >>> miner = ProtoOTMiner(memory)
        >>> indices = torch.tensor([0, 1, 2, 8, 9, 10]).repeat(2)  # two views of six samples
        >>> embeddings = torch.randn(12, 4)
        >>> a1, p, a2, n = miner(embeddings, indices)
        >>> sorted(zip(a1.tolist(), p.tolist()))[:2]  # each view's positive is the other view
        [(0, 6), (1, 7)]
        >>> loss = NTXentLoss()(embeddings, indices, (a1, p, a2, n))
        >>> bool(torch.isfinite(loss))
        True
    """

    def __init__(
        self, memory, *, positives="instance", cross_domain=True, type_of_tuple="pairs", update_prototypes=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_choice("positives", positives, ("instance", "agreement"))
        check_choice("type_of_tuple", type_of_tuple, ("pairs", "triplets"))
        check_memory_to_train(memory, "ProtoOTMiner")
        self.memory = memory
        self.positives = positives
        self.cross_domain = check_bool("cross_domain", cross_domain)
        self.type_of_tuple = type_of_tuple
        self.update_prototypes = check_bool("update_prototypes", update_prototypes)
        self._labels_checked = False

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """PML's ``BaseMiner.forward``, with ``labels``/``ref_labels`` sequences taken as index tensors, as
        ``ProtoOTLoss`` takes them (PML reads ``labels.shape`` first: a list failed with an AttributeError)."""
        labels = as_index_tensor("labels", labels)
        ref_labels = None if ref_labels is None else as_index_tensor("ref_labels", ref_labels)
        return super().forward(embeddings, labels, ref_emb, ref_labels)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        """Return PML indices: ``(a1, p, a2, n)`` for pairs or ``(a, p, n)`` for triplets.

        ``labels`` (B,) and ``ref_labels`` (R,) are global sample indices; the
        anchors index ``embeddings`` (B, D), positives/negatives index ``ref_emb`` (R, D).
        """
        labels = self.memory.check_indices("labels", labels)
        if not self._labels_checked:  # passing class labels shows in the first batch large enough to judge
            self._labels_checked = warn_if_class_labels(self.memory, "labels", labels)
        is_self_reference = ref_emb is embeddings
        ref_labels = self._reference_indices(labels, ref_emb, ref_labels, is_self_reference)
        slots, own, cross = self._step_pseudo_labels(torch.cat([labels, ref_labels]))
        batch = len(labels)
        positives, negatives = self._agreement_masks(
            (slots[:batch], own[:batch], cross[:batch]), (slots[batch:], own[batch:], cross[batch:])
        )
        if self.positives == "instance":
            positives = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
        if is_self_reference:
            positives.fill_diagonal_(False)  # a sample is not its own positive (PML's convention)
        if self.positives == "instance" and not bool(positives.any()):
            warnings.warn(
                'ProtoOTMiner(positives="instance") found no positive pair: no index of labels is in ref_labels '
                "(or twice in labels); pass two views with equal indices, or momentum keys as ref_emb",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )
        positives, negatives = positives.to(embeddings.device), negatives.to(embeddings.device)
        if self.type_of_tuple == "triplets":
            anchors, positive, negative = torch.where(positives.unsqueeze(2) & negatives.unsqueeze(1))
            return anchors, positive, negative
        a1, p = torch.where(positives)
        a2, n = torch.where(negatives)
        return a1, p, a2, n

    def _reference_indices(self, labels, ref_emb, ref_labels, is_self_reference) -> torch.Tensor:
        """``ref_labels`` checked; ``None`` means the references share ``labels`` (momentum keys)."""
        if ref_labels is None:
            if len(ref_emb) != len(labels):
                raise ValueError(f"ref_labels=None means ref_emb holds the keys of labels' samples, one per label "
                                 f"({len(labels)}), got {len(ref_emb)} rows: pass their global indices as ref_labels")
            return labels
        ref_labels = self.memory.check_indices("ref_labels", ref_labels)
        if is_self_reference and not torch.equal(ref_labels, labels):
            raise ValueError("ref_emb is embeddings, so ref_labels must be None or equal to labels (a row's global "
                             "index does not change), got different indices")
        return labels if is_self_reference else ref_labels

    def _step_pseudo_labels(self, indices):
        """Domain slot ``(M,)``, own-domain label ``(M,)`` and label under every domain's prototypes ``(M, D)``;
        then, with ``update_prototypes``, the memory's prototype step.

        With ``update_prototypes`` the labels come from the memory's step methods, so ``refresh_every > 1``
        labels from its cached plans between refreshes, as ``ProtoOTLoss`` does; without it nothing steps
        the memory, whose cached plans would go stale, and every label is exact. Entries of ``cross`` that
        are not computed (``cross_domain=False``) hold -1.
        """
        self.memory.check_ready()
        num_domains = self.memory.num_domains
        device = indices.device
        slots = torch.empty(len(indices), dtype=torch.long, device=device)
        cross = torch.full((len(indices), num_domains), -1, dtype=torch.long, device=device)
        # With update_prototypes, domains only other ranks' batches hold come too (no positions): their
        # prototypes, and with refresh_every > 1 their cached plans, move on every rank alike.
        groups = self.memory.split_by_domain(indices, across_ranks=self.update_prototypes)
        caching = self.update_prototypes and self.memory.refresh_every > 1
        for slot, positions, rows in groups:
            slots[positions] = slot
            for target in range(num_domains) if self.cross_domain and (len(positions) or caching) else []:
                if target != slot:
                    cross[positions, target] = self._labels(slot, target, rows).to(device)
        # Own labels last, each read before its domain's prototypes move (and the cross labels before any
        # move): every pseudo-label of this batch comes from one set of prototypes.
        for slot, positions, rows in groups:
            if self.update_prototypes:
                cross[positions, slot] = self.memory._step_pseudo_labels(slot, rows).to(device)
            else:
                cross[positions, slot] = self._labels(slot, slot, rows).to(device)
        own = cross.gather(1, slots.unsqueeze(1)).squeeze(1)
        return slots, own, cross

    def _labels(self, slot: int, target: int, rows: torch.Tensor) -> torch.Tensor:
        """Labels of bank ``slot``'s ``rows`` under domain ``target``'s prototypes: from the memory's refresh
        cache when the prototypes move (``update_prototypes``), else from the exact plan."""
        if self.update_prototypes:
            return self.memory._cross_pseudo_labels(slot, target, rows)
        return self.memory.assign(slot, target)[rows].argmax(dim=1)

    def _agreement_masks(self, anchors, refs):
        """Positive and negative ``(B, R)`` masks from mutual agreement of pseudo-labels.

        ``anchors`` and ``refs`` are ``(slots, own, cross)`` triples from :meth:`_step_pseudo_labels`.
        """
        anchor_slots, anchor_own, anchor_cross = anchors
        ref_slots, ref_own, ref_cross = refs
        # anchor i's label under ref j's prototypes equals j's own label, and vice versa
        anchor_agrees = anchor_cross[:, ref_slots] == ref_own.unsqueeze(0)
        ref_agrees = ref_cross[:, anchor_slots].T == anchor_own.unsqueeze(1)
        positives = anchor_agrees & ref_agrees
        negatives = ~anchor_agrees & ~ref_agrees
        if not self.cross_domain:
            same_domain = anchor_slots.unsqueeze(1) == ref_slots.unsqueeze(0)
            positives &= same_domain
            negatives &= same_domain
        return positives, negatives
