"""ProtoOT's precision at k next to PML's retrieval metrics, from one exact chunked ranking."""
from __future__ import annotations

import logging
import math
import warnings
from typing import Iterable

import numpy as np
import torch
import tqdm
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator, maybe_get_avg_of_avgs

from ._checks import as_index_tensor, check_matrix, check_positive_int

__all__ = ["PrecisionAtKCalculator"]

logger = logging.getLogger(__name__)

# Metrics that read the ranked list only down to depth R (or max k): exact from a top-R search.
_DEPTH_METRICS = ("r_precision", "mean_average_precision_at_r")
# Metrics that need the whole ranking (every relevant item's rank): one full sort per query.
_FULL_RANKING_METRICS = ("mean_average_precision", "mean_reciprocal_rank")


class PrecisionAtKCalculator(AccuracyCalculator):
    r"""PML ``AccuracyCalculator`` with ProtoOT's micro precision at k, exact and memory-bounded.

    For every ``k`` in ``k_values`` it adds the metric ``precision_at_{k}``, ProtoOT's
    definition: with :math:`R_q` the number of gallery items of query :math:`q`'s class and
    :math:`\mathrm{hits}_q(m)` the relevant items among its top :math:`m`,

    .. math::

        P@k = \frac{\sum_q \mathrm{hits}_q(\min(k, R_q))}{\sum_q \min(k, R_q)}

    (a micro average over queries). At ``k = 1`` this is exactly PML's ``precision_at_1``.
    PML's ``r_precision``, ``mean_average_precision_at_r``, ``mean_average_precision``
    (at full depth, i.e. PML with ``k=None``), ``mean_reciprocal_rank``, ``NMI`` and ``AMI``
    stay available through ``include=``/``exclude=``; all ranking metrics of one call share
    one pass over the gallery.

    How it ranks: similarity is the inner product of L2-normalised embeddings (cosine), the
    ProtoOT protocol. Queries are processed in chunks of ``C`` rows so that peak memory is
    :math:`O(C \cdot G)` for a gallery of ``G`` items (``chunk_bytes`` bounds it). Within a
    chunk the top ``depth`` items are found exactly by a threshold estimated on a column
    sample, checked, and every item at or above it sorted by (similarity descending, gallery
    index ascending), so ties are broken deterministically by gallery index. The depth comes
    from the request (max ``k``, max ``R`` for R-based metrics, the whole gallery for
    ``mean_average_precision``/``mean_reciprocal_rank``), so nothing is silently capped as
    with PML's ``k``. Full-depth metrics cost a sort of every row, :math:`O(NG\log G)`:
    exclude them on large sets if speed matters.

    Queries whose class has no gallery item (:math:`R_q = 0`, after removing the query
    itself when ``ref_includes_query``) are excluded from every metric and counted in a
    ``UserWarning``.

    Args:
        k_values: positive integers; one metric ``precision_at_{k}`` each. ``k`` may exceed
            ``R`` or the gallery size (then ``min(k, R) = R``).
        include: metric names to compute (all when empty), as in PML.
        exclude: metric names to skip, as in PML.
        avg_of_avgs: average per class first, then over classes (per-sample metrics: mean of
            class means; ``precision_at_k``: mean of per-class micro averages).
        return_per_class: return a list with one value per query class instead.
        device: where the similarity chunks are computed; PML's default (cuda if available).
        chunk_bytes: memory budget for one similarity chunk and its sort (bytes).
        kmeans_func: clustering for ``NMI``/``AMI``, as in PML.
        progress: show a tqdm bar over query chunks.

    Raises:
        ValueError: a ``k`` that is not a positive integer, an empty ``k_values``, or a
            non-positive ``chunk_bytes``; PML's own checks on ``include``/``exclude``.
        TypeError: ``k_values`` is not an iterable of integers.

    Example:
        >>> import torch
        >>> from pml_protoot.accuracy import PrecisionAtKCalculator
        >>> calc = PrecisionAtKCalculator(k_values=(1, 2), include=("precision_at_1", "precision_at_2"), device=torch.device("cpu"))
        >>> query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> gallery = torch.tensor([[1.0, 0.1], [0.9, 0.3], [0.2, 1.0]])
        >>> calc.get_accuracy(query, torch.tensor([0, 1]), gallery, torch.tensor([0, 0, 1]))
        {'precision_at_1': 1.0, 'precision_at_2': 1.0}
    """

    def __init__(
        self,
        k_values: Iterable[int] = (1, 5, 15),
        include=(),
        exclude=(),
        avg_of_avgs: bool = False,
        return_per_class: bool = False,
        device: torch.device | None = None,
        chunk_bytes: int = 2**28,
        kmeans_func=None,
        progress: bool = False,
    ):
        self.k_values = _check_k_values(k_values)
        self.chunk_bytes = check_positive_int("chunk_bytes", chunk_bytes)
        self.progress = progress
        # PML discovers metrics from ``calculate_*`` attributes, so each requested k gets one.
        for k in self.k_values:
            setattr(self, f"calculate_precision_at_{k}", self._precision_at_k_metric(k))
        super().__init__(
            include=include,
            exclude=exclude,
            avg_of_avgs=avg_of_avgs,
            return_per_class=return_per_class,
            device=device,
            kmeans_func=kmeans_func,
        )

    def requires_knn(self):
        return super().requires_knn() + ["mean_reciprocal_rank"] + [f"precision_at_{k}" for k in self.k_values]

    def get_accuracy(
        self,
        query,
        query_labels,
        reference=None,
        reference_labels=None,
        ref_includes_query: bool = False,
        include=(),
        exclude=(),
    ) -> dict:
        """Compute the requested metrics of ``query`` retrieving from ``reference``.

        Args:
            query: ``(Q, D)`` embeddings (tensor or array, any float dtype).
            query_labels: ``(Q,)`` integer class labels.
            reference: ``(G, D)`` gallery embeddings; ``None`` means the query set itself
                (then ``ref_includes_query`` is forced to True, as in PML).
            reference_labels: ``(G,)`` integer class labels.
            ref_includes_query: the first ``Q`` gallery rows are the queries; each query's
                own row is left out of its ranking and of its ``R``.
            include: metric names for this call only (all configured when empty).
            exclude: metric names to skip in this call.

        Returns:
            ``{metric_name: float}`` (a list per class with ``return_per_class``); NaN when
            every query has ``R = 0``.

        Raises:
            TypeError: non-tensor/non-float embeddings or non-integer labels.
            ValueError: labels not 1-D, lengths that differ from their embeddings,
                different embedding widths, empty sets, non-finite values, or
                ``ref_includes_query`` with a reference that does not start with the query.
        """
        if reference is None:
            reference, reference_labels, ref_includes_query = query, query_labels, True
        query, reference = _as_embeddings("query", query), _as_embeddings("reference", reference)
        query_labels = _as_labels("query_labels", query_labels, len(query), "query")
        reference_labels = _as_labels("reference_labels", reference_labels, len(reference), "reference")
        if query.shape[1] != reference.shape[1]:
            raise ValueError(
                f"query and reference must have the same embedding size, got {query.shape[1]} and {reference.shape[1]}"
            )
        if ref_includes_query:
            _check_reference_starts_with_query(query, query_labels, reference, reference_labels)

        self.curr_function_dict = self.get_function_dict(include, exclude)
        metrics = self.get_curr_metrics()
        kwargs = {
            "query": query,
            "reference": reference,
            "query_labels": query_labels,
            "reference_labels": reference_labels,
            "ref_includes_query": ref_includes_query,
        }
        if any(name in self.requires_knn() for name in metrics):
            kwargs.update(self._ranking_statistics(query, query_labels, reference, reference_labels, ref_includes_query))
        if any(name in self.requires_clustering() for name in metrics):
            kwargs["cluster_labels"] = self.get_cluster_labels(query.float(), query_labels)
        return self._get_accuracy(self.curr_function_dict, **kwargs)

    # ----------------------------------------------------------------- the ranking pass
    def _ranking_statistics(self, query, query_labels, reference, reference_labels, ref_includes_query) -> dict:
        """Per-query statistics of the ranking, for the queries with ``R > 0`` only."""
        relevant_counts = _relevant_counts(query_labels, reference_labels, ref_includes_query)
        valid = relevant_counts > 0
        if not bool(valid.all()):
            warnings.warn(
                f"{int((~valid).sum())} of {len(valid)} queries have no item of their class in the "
                "reference set (R = 0) and are excluded from every metric",
                UserWarning,
                stacklevel=3,
            )
        stats = {"valid_query_labels": query_labels[valid], "relevant_counts": relevant_counts[valid]}
        if not bool(valid.any()):
            return stats
        depth = self._required_depth(relevant_counts[valid], len(reference) - int(ref_includes_query))
        per_chunk = [
            self._chunk_statistics(*chunk, reference, reference_labels, depth)
            for chunk in self._query_chunks(query, query_labels, relevant_counts, valid, ref_includes_query, len(reference))
        ]
        stats.update({name: torch.cat([c[name] for c in per_chunk]) for name in per_chunk[0]})
        return stats

    def _required_depth(self, relevant_counts: torch.Tensor, gallery_size: int) -> int:
        metrics = set(self.get_curr_metrics())
        max_r = int(relevant_counts.max())
        depth = 1
        if metrics & set(_FULL_RANKING_METRICS):
            depth = gallery_size
        if metrics & set(_DEPTH_METRICS):
            depth = max(depth, max_r)
        asked_k = [k for k in self.k_values if f"precision_at_{k}" in metrics]
        if asked_k:
            depth = max(depth, min(max(asked_k), max_r))
        return depth

    def _query_chunks(self, query, query_labels, relevant_counts, valid, ref_includes_query, gallery_size):
        """Yield (query rows, labels, R, own reference index or -1) for chunks of valid queries."""
        rows_per_chunk = max(1, self.chunk_bytes // (16 * gallery_size))
        valid_rows = torch.nonzero(valid).flatten()
        starts = range(0, len(valid_rows), rows_per_chunk)
        for start in tqdm.tqdm(starts, desc="ranking", disable=not self.progress):
            rows = valid_rows[start : start + rows_per_chunk]
            own_index = rows if ref_includes_query else torch.full_like(rows, -1)
            yield query[rows], query_labels[rows], relevant_counts[rows], own_index

    def _chunk_statistics(self, query, query_labels, relevant_counts, own_index, reference, reference_labels, depth):
        similarities = _cosine_similarities(query, reference, self.device)
        has_self = own_index >= 0
        similarities[torch.nonzero(has_self).flatten(), own_index[has_self].to(self.device)] = -math.inf
        ranked = _top_ranked(similarities, depth).cpu()
        is_relevant = reference_labels[ranked] == query_labels[:, None]
        return _list_statistics(is_relevant, relevant_counts, self.k_values)

    # ----------------------------------------------------------------- metrics
    def _precision_at_k_metric(self, k: int):
        def calculate(query_labels=None, **kwargs):
            if "hits_at_k" not in kwargs or len(kwargs["valid_query_labels"]) == 0:
                return self._nan(query_labels)
            column = self.k_values.index(k)
            denominators = torch.clamp(kwargs["relevant_counts"], max=k).double()
            return self._micro_average(kwargs["hits_at_k"][:, column].double(), denominators, kwargs["valid_query_labels"])

        calculate.__doc__ = f"ProtoOT's micro precision at {k} (see the class docstring)."
        return calculate

    def calculate_precision_at_1(self, query_labels=None, **kwargs):
        """Fraction of queries whose nearest neighbour is relevant (equals ProtoOT's P@1)."""
        return self._per_query_metric("first_is_relevant", query_labels, kwargs)

    def calculate_r_precision(self, query_labels=None, **kwargs):
        """Mean over queries of (relevant items among the top R) / R, exact at any R."""
        return self._per_query_metric("r_precision", query_labels, kwargs)

    def calculate_mean_average_precision_at_r(self, query_labels=None, **kwargs):
        """PML's MAP@R: mean over queries of sum_{i<=R} P(i) rel(i) / R, exact at any R."""
        return self._per_query_metric("average_precision_at_r", query_labels, kwargs)

    def calculate_mean_average_precision(self, query_labels=None, **kwargs):
        """Mean average precision over the whole ranking (PML's value with ``k=None``)."""
        return self._per_query_metric("average_precision", query_labels, kwargs)

    def calculate_mean_reciprocal_rank(self, query_labels=None, **kwargs):
        """Mean over queries of 1 / (rank of the first relevant item), whole ranking."""
        return self._per_query_metric("reciprocal_rank", query_labels, kwargs)

    def _per_query_metric(self, name, query_labels, stats):
        if name not in stats or len(stats["valid_query_labels"]) == 0:
            return self._nan(query_labels)
        return maybe_get_avg_of_avgs(stats[name], stats["valid_query_labels"], self.avg_of_avgs, self.return_per_class)

    def _micro_average(self, numerators, denominators, labels):
        if not (self.avg_of_avgs or self.return_per_class):
            return (numerators.sum() / denominators.sum()).item()
        classes, group = torch.unique(labels, return_inverse=True)
        per_class = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, group, numerators)
        per_class /= torch.zeros(len(classes), dtype=torch.float64).index_add_(0, group, denominators)
        return per_class.tolist() if self.return_per_class else per_class.mean().item()

    def _nan(self, query_labels):
        if self.return_per_class:
            return [math.nan] * len(torch.unique(query_labels))
        return math.nan

    def description(self):
        base = super().description()
        return "_".join(filter(None, [base, "protoot_p_at_k"]))


# --------------------------------------------------------------------- helpers
def _check_k_values(k_values) -> tuple[int, ...]:
    try:
        values = tuple(k_values)
    except TypeError as err:
        raise TypeError(f"k_values must be an iterable of positive integers, got {type(k_values).__name__}") from err
    if not values:
        raise ValueError("k_values must hold at least one positive integer, got an empty sequence")
    for k in values:
        if isinstance(k, (np.integer,)):
            k = int(k)
        check_positive_int("k_values entry", k)
    return tuple(sorted({int(k) for k in values}))


def _as_embeddings(name, values) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    tensor = check_matrix(name, values)
    if len(tensor) == 0:
        raise ValueError(f"{name} must hold at least one embedding, got shape {tuple(tensor.shape)}")
    return tensor


def _as_labels(name, labels, expected_length, embeddings_name) -> torch.Tensor:
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    labels = as_index_tensor(name, labels).cpu()
    if len(labels) != expected_length:
        raise ValueError(
            f"{name} must have one label per {embeddings_name} embedding ({expected_length}), got {len(labels)}"
        )
    return labels


def _check_reference_starts_with_query(query, query_labels, reference, reference_labels) -> None:
    head = reference[: len(query)]
    if len(head) != len(query) or not torch.equal(head.to(query.dtype), query) or not torch.equal(
        reference_labels[: len(query)], query_labels
    ):
        raise ValueError(
            "ref_includes_query=True requires reference[:len(query)] == query and "
            "reference_labels[:len(query)] == query_labels"
        )


def _relevant_counts(query_labels, reference_labels, ref_includes_query) -> torch.Tensor:
    """R for each query: gallery items of its class, minus itself when the gallery holds it."""
    classes, inverse = torch.unique(torch.cat([query_labels, reference_labels]), return_inverse=True)
    per_class = torch.bincount(inverse[len(query_labels) :], minlength=len(classes))
    return per_class[inverse[: len(query_labels)]] - int(ref_includes_query)


def _cosine_similarities(query, reference, device) -> torch.Tensor:
    """(C, G) inner products of L2-normalised rows, float32 (float64 for float64 input)."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    query = torch.nn.functional.normalize(query.to(device=device, dtype=dtype), dim=1)
    reference = torch.nn.functional.normalize(reference.to(device=device, dtype=dtype), dim=1)
    return query @ reference.T


def _top_ranked(similarities: torch.Tensor, depth: int) -> torch.Tensor:
    """(C, depth) gallery indices ranked by (similarity descending, index ascending).

    Exact, including ties at the cut: every item whose similarity reaches a row's
    threshold is kept before the stable sort, so equal items are ordered by index.
    """
    num_rows, gallery_size = similarities.shape
    if 4 * depth >= gallery_size:
        return torch.sort(similarities, dim=1, descending=True, stable=True).indices[:, :depth]
    thresholds = _estimated_thresholds(similarities, depth)
    rows, cols = torch.nonzero(similarities >= thresholds[:, None], as_tuple=True)
    counts = torch.bincount(rows, minlength=num_rows)
    short = counts < depth
    if bool(short.any()):
        # The sample underestimated these rows: use their exact depth-th value instead.
        thresholds[short] = torch.topk(similarities[short], depth, dim=1).values[:, -1]
        rows, cols = torch.nonzero(similarities >= thresholds[:, None], as_tuple=True)
        counts = torch.bincount(rows, minlength=num_rows)
    # Pack each row's candidates (nonzero lists them by ascending index) and sort stably.
    slot = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    packed = similarities.new_full((num_rows, int(counts.max())), -math.inf)
    packed[rows, slot] = similarities[rows, cols]
    candidates = torch.zeros_like(packed, dtype=torch.long)
    candidates[rows, slot] = cols
    order = torch.sort(packed, dim=1, descending=True, stable=True).indices[:, :depth]
    return candidates.gather(1, order)


def _estimated_thresholds(similarities: torch.Tensor, depth: int) -> torch.Tensor:
    """A per-row similarity that about ``depth`` (plus a margin) items reach, from a column sample."""
    gallery_size = similarities.shape[1]
    stride = max(1, gallery_size // (8 * depth))
    sample = similarities[:, ::stride]
    expected = depth * sample.shape[1] / gallery_size
    rank = min(sample.shape[1], math.ceil(expected + 3 * math.sqrt(expected) + 2))
    return torch.topk(sample, rank, dim=1).values[:, -1].clone()


def _list_statistics(is_relevant: torch.Tensor, relevant_counts: torch.Tensor, k_values) -> dict:
    """Per-query statistics from (C, depth) relevance of ranked lists.

    ``hits_at_k[:, j]`` counts relevant items in the top min(k_j, R); the average
    precisions use P(i) = (relevant in top i) / i summed over relevant positions i.
    """
    depth = is_relevant.shape[1]
    hits = torch.cumsum(is_relevant, dim=1)
    positions = torch.arange(1, depth + 1)
    precision_terms = is_relevant * hits.double() / positions
    r_column = (torch.clamp(relevant_counts, max=depth) - 1)[:, None]
    within_r = positions[None, :] <= relevant_counts[:, None]
    k_columns = torch.clamp(torch.minimum(torch.tensor(k_values)[None, :], relevant_counts[:, None]), max=depth) - 1
    first_relevant = torch.argmax(is_relevant.int(), dim=1) + 1
    return {
        "hits_at_k": hits.gather(1, k_columns),
        "first_is_relevant": is_relevant[:, 0].double(),
        "r_precision": hits.gather(1, r_column).flatten().double() / relevant_counts,
        "average_precision_at_r": (precision_terms * within_r).sum(1) / relevant_counts,
        "average_precision": precision_terms.sum(1) / relevant_counts,
        "reciprocal_rank": torch.where(is_relevant.any(1), 1.0 / first_relevant.double(), 0.0),
    }
