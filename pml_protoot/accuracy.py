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
# Sampled items expected above the cut when estimating a row's threshold (accuracy vs sample size).
_SAMPLED_HITS = 32
# Candidates per row aimed at for small depths, where a sample cannot estimate the cut.
_MIN_CANDIDATES = 64
# The low 32 bits of a ranking key: (gallery index << 1) | relevant.
_PAYLOAD_BITS = 32
_PADDING_PAYLOAD = 2**_PAYLOAD_BITS - 2  # not relevant, an index no gallery has
_PADDING_KEY = 2**63 - 2**_PAYLOAD_BITS + _PADDING_PAYLOAD  # sorts after every real key


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
        """Per-query statistics of the ranking, for the queries with ``R > 0`` only (in query order)."""
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
        gallery = _ClassSortedGallery(reference, reference_labels, self.device)
        query = _normalised(query, self.device)
        rows_per_chunk = max(1, self.chunk_bytes // (16 * len(reference)))
        buffer = query.new_empty(min(rows_per_chunk, len(query)), len(reference))
        rows_done, per_chunk = [], []
        for rows in tqdm.tqdm(
            list(_class_chunks(query_labels, valid, rows_per_chunk)), desc="ranking", disable=not self.progress
        ):
            block = gallery.block(int(query_labels[rows[0]]))
            similarities = torch.mm(query[rows.to(query.device)], gallery.embeddings.T, out=buffer[: len(rows)])
            if ref_includes_query:
                # Each query's own gallery row ranks last and is outside its R.
                similarities[torch.arange(len(rows), device=query.device), gallery.position[rows].to(query.device)] = -math.inf
            per_chunk.append(self._chunk_statistics(similarities, block, gallery.ids, int(relevant_counts[rows[0]])))
            rows_done.append(rows)
        # Chunks follow classes; put the statistics back in query order (that of valid_query_labels).
        order = torch.argsort(torch.cat(rows_done))
        stats.update({name: torch.cat([c[name] for c in per_chunk])[order] for name in per_chunk[0]})
        return stats

    def _chunk_statistics(self, similarities, block, gallery_ids, relevant_count) -> dict:
        """Statistics of a chunk of queries of one class from their (C, G) similarities.

        Every gallery item at or above a per-query threshold is ranked exactly; the threshold
        is low enough that the ranked list covers what the requested metrics read.
        """
        metrics = set(self.get_curr_metrics())
        depth = self._required_depth(relevant_count, metrics)
        relevant = similarities[:, block.start : block.stop]
        thresholds = _estimated_thresholds(similarities, depth)
        if "mean_average_precision" in metrics:  # every relevant item's rank is needed
            thresholds = torch.minimum(thresholds, relevant.masked_fill(relevant == -math.inf, math.inf).amin(1))
        elif "mean_reciprocal_rank" in metrics:  # the first relevant item's rank is needed
            thresholds = torch.minimum(thresholds, relevant.amax(1))
        ranked = _ranked_payload(similarities, thresholds, depth, block, gallery_ids)
        width = ranked.shape[1] if metrics & set(_FULL_RANKING_METRICS) else depth
        is_relevant = (ranked[:, :width] & 1).bool().cpu()
        return _list_statistics(is_relevant, torch.full((len(is_relevant),), relevant_count), self.k_values)

    def _required_depth(self, relevant_count: int, metrics: set) -> int:
        """How far down the ranked list the depth-bounded metrics read, for queries with this R."""
        depth = 1
        if metrics & set(_DEPTH_METRICS):
            depth = relevant_count
        asked_k = [k for k in self.k_values if f"precision_at_{k}" in metrics]
        if asked_k:
            depth = max(depth, min(max(asked_k), relevant_count))
        return depth

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


def _normalised(embeddings, device) -> torch.Tensor:
    """L2-normalised rows on ``device``, float32 (float64 for float64 input): cosine = inner product."""
    dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    return torch.nn.functional.normalize(embeddings.to(device=device, dtype=dtype), dim=1)


class _ClassSortedGallery:
    """The normalised gallery with its rows grouped by class (stable, so by index within a class).

    A query's relevant items are then one contiguous block of columns of its similarity row.

    Attributes:
        embeddings: ``(G, D)`` normalised rows in class order.
        ids: ``(G,)`` original gallery index of each row (the tie-breaker of the ranking).
        position: ``(G,)`` row of each original gallery index.
    """

    def __init__(self, reference, reference_labels, device):
        order = torch.sort(reference_labels, stable=True)
        self.ids = order.indices.to(device)
        self.position = torch.argsort(order.indices)
        self.embeddings = _normalised(reference, device)[self.ids]
        self._labels = order.values

    def block(self, label: int) -> slice:
        start = int(torch.searchsorted(self._labels, label))
        return slice(start, int(torch.searchsorted(self._labels, label, right=True)))


def _class_chunks(query_labels, valid, rows_per_chunk):
    """Yield index tensors of at most ``rows_per_chunk`` valid queries, all of one class."""
    rows = torch.nonzero(valid).flatten()
    labels = query_labels[rows]
    for label in torch.unique(labels):
        same_class = rows[labels == label]
        yield from torch.split(same_class, rows_per_chunk)


def _estimated_thresholds(similarities: torch.Tensor, depth: int) -> torch.Tensor:
    """A per-row similarity that a little more than ``depth`` items reach, from a column sample.

    Every ``stride``-th column is sampled, so that about ``_SAMPLED_HITS`` sampled items lie
    above the row's true cut; the threshold is taken 3 binomial standard deviations further
    down, so it is rarely too high (the caller checks) and rows keep about
    ``depth * (1 + 3 / sqrt(_SAMPLED_HITS))`` candidates. Small depths use a sparser sample
    and its ``depth``-th value, which is never too high, for about ``_MIN_CANDIDATES``.
    """
    gallery_size = similarities.shape[1]
    stride = max(1, depth // _SAMPLED_HITS, _MIN_CANDIDATES // depth)
    sample = similarities[:, ::stride]
    expected = depth * sample.shape[1] / gallery_size
    # The depth-th largest of a subset is never above the row's own depth-th largest.
    rank = min(depth, sample.shape[1], math.ceil(expected + 3 * math.sqrt(expected) + 1))
    return _kth_largest(sample, rank)


def _kth_largest(rows: torch.Tensor, k: int) -> torch.Tensor:
    """(C,) k-th largest value of each row (numpy's introselect on CPU: ~10x torch.topk there)."""
    if rows.device.type == "cpu":
        column = rows.shape[1] - k
        return torch.from_numpy(np.partition(rows.numpy(), column, axis=1)[:, column].copy())
    return torch.topk(rows, k, dim=1).values[:, -1]


def _ranked_payload(similarities, thresholds, depth, relevant_block, column_ids) -> torch.Tensor:
    """The ranked list of every row down to (at least) ``depth`` and to its threshold.

    Args:
        similarities: ``(C, G)`` similarities (-inf for excluded items).
        thresholds: ``(C,)`` candidates are the items at or above them; rows where fewer than
            ``depth`` items reach it get their ``depth``-th relevant similarity instead (a safe
            lower bound of the ``depth``-th similarity, as the relevant items themselves reach it).
        depth: at most the number of finite relevant similarities of every row.
        relevant_block: the columns of the relevant items.
        column_ids: ``(G,)`` gallery index of each column (ties rank by ascending index).

    Returns:
        ``(C, L)`` int64, ``L >= depth``: ``(index << 1) | relevant`` in ranking order
        (similarity descending, index ascending); ``_PADDING_PAYLOAD`` after a row's candidates.
    """
    candidates = _Candidates(similarities, thresholds)
    short = candidates.counts < depth
    if bool(short.any()):
        relevant = similarities[:, relevant_block.start : relevant_block.stop]
        thresholds = thresholds.clone()
        thresholds[short] = torch.topk(relevant[short], depth, dim=1).values[:, -1]
        candidates = _Candidates(similarities, thresholds)
    return candidates.ranked_payload(column_ids, relevant_block)


class _Candidates:
    """The items of each row of ``similarities`` at or above that row's threshold.

    Attributes:
        flat, rows, columns: 1-D positions, row-major order (so ascending column within a row).
        counts: ``(C,)`` candidates per row.
    """

    def __init__(self, similarities, thresholds):
        self.similarities = similarities
        self.flat = _flat_nonzero(similarities >= thresholds[:, None])
        self.rows = torch.div(self.flat, similarities.shape[1], rounding_mode="floor")
        self.columns = self.flat - self.rows * similarities.shape[1]
        self.counts = torch.bincount(self.rows, minlength=len(similarities))

    def ranked_payload(self, column_ids, relevant_block) -> torch.Tensor:
        """(C, max count) int64: per row, ``(id << 1) | relevant`` of the candidates in ranking
        order (similarity descending, id ascending); padding ``_PADDING_PAYLOAD`` (not relevant)."""
        columns = self.columns
        is_relevant = (columns >= relevant_block.start) & (columns < relevant_block.stop)
        payload = (column_ids[columns] << 1) | is_relevant.long()
        # +0.0 turns -0.0 into 0.0, which the comparison above treats as equal.
        values = self.similarities.view(-1)[self.flat] + 0.0
        width = int(self.counts.max())
        starts = torch.cumsum(self.counts, 0) - self.counts
        slots = torch.arange(len(columns), device=columns.device) - starts[self.rows]
        if values.dtype == torch.float32:
            # One int64 key per item, (descending value, id, flag): one plain sort ranks exactly.
            keys = torch.full((len(self.counts), width), _PADDING_KEY, dtype=torch.long, device=columns.device)
            keys[self.rows, slots] = (_descending_key(values) << _PAYLOAD_BITS) | payload
            return _sort_rows(keys) & (2**_PAYLOAD_BITS - 1)
        # float64 values need all 64 bits: order by id, then stably by value.
        keys = torch.full((len(self.counts), width), _PADDING_KEY, dtype=torch.long, device=columns.device)
        keys[self.rows, slots] = _descending_key(values)
        packed = torch.full_like(keys, _PADDING_PAYLOAD)
        packed[self.rows, slots] = payload
        by_id = torch.sort(packed, dim=1)
        by_value = torch.sort(keys.gather(1, by_id.indices), dim=1, stable=True).indices
        return by_id.values.gather(1, by_value)


def _descending_key(values: torch.Tensor) -> torch.Tensor:
    """int64 keys whose ascending order is the descending order of the (finite) float values.

    IEEE bits read as a signed integer order positive floats; flipping the magnitude bits of
    negative ones orders those too; bitwise NOT reverses the order.
    """
    int_dtype = torch.int32 if values.dtype == torch.float32 else torch.int64
    bits = values.view(int_dtype)
    magnitude_mask = torch.iinfo(int_dtype).max
    ascending = bits ^ ((bits >> (bits.element_size() * 8 - 1)) & magnitude_mask)
    return (~ascending).long()


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries (numpy on CPU: ~7x torch.nonzero there)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask.flatten()).flatten()


def _sort_rows(keys: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending (numpy's SIMD sort on CPU: ~5x torch.sort there)."""
    if keys.device.type == "cpu":
        return torch.from_numpy(np.sort(keys.numpy(), axis=1))
    return torch.sort(keys, dim=1).values


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
