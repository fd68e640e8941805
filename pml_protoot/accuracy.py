"""ProtoOT's precision at k next to PML's retrieval metrics, from one exact chunked ranking."""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Iterable

import numpy as np
import torch
from pytorch_metric_learning.utils.accuracy_calculator import EQUALITY, AccuracyCalculator, maybe_get_avg_of_avgs
from pytorch_metric_learning.utils.inference import FaissKMeans

from ._checks import as_index_tensor, caller_stacklevel, check_bool, check_choice, check_matrix, check_positive_int
from ._progress import progress_bar
from ._tensors import unit_rows

__all__ = ["PrecisionAtKCalculator"]

#: The R = 0 warning's words after "<n> of <m>": CrossDomainTester names the pair in its own.
NO_CLASS_MATES = "queries have no item of their class in the reference set (R = 0)"

# Metrics that read the ranked list only down to depth R (or max k): exact from a top-R search.
_DEPTH_METRICS = ("r_precision", "mean_average_precision_at_r")
# Metrics that need the whole ranking (every relevant item's rank): one full sort per query.
_FULL_RANKING_METRICS = ("mean_average_precision", "mean_reciprocal_rank")
# Sampled items expected above the cut when estimating a row's threshold (accuracy vs sample size).
_SAMPLED_HITS = 32
# Candidates per row aimed at for small depths, where a sample cannot estimate the cut.
_MIN_CANDIDATES = 64
# Every 8th gallery item at most is sampled: the estimate costs at most 1/8 of the product.
_MIN_SAMPLE_STRIDE = 8
# Bytes of one (queries x gallery columns) similarity tile on CPU (fits the L3 cache; 8 MiB
# ran faster than 2 MiB, which makes more tiles, and than 32 MiB at N = 50k).
_CACHE_TILE_BYTES = 2**23
# Queries per chunk at most (the product is then large enough to run at full speed).
_MAX_CHUNK_ROWS = 512
# The low 32 bits of a ranking key: (gallery index << 1) | relevant.
_PAYLOAD_BITS = 32
_INT32_MAX = 2**31 - 1  # padding of int32 ranking keys: flag bit set (not relevant), sorts last
_PADDING_PAYLOAD = 2**_PAYLOAD_BITS - 2  # not relevant, an index no gallery has
_PADDING_KEY = 2**63 - 2**_PAYLOAD_BITS + _PADDING_PAYLOAD  # sorts after every real key
PREFILTERS = ("auto", "bf16", None)
# Unit roundoffs (half the spacing at 1, relative): bfloat16 keeps 8 significant bits, float32 24.
_BF16_UNIT_ROUNDOFF = 2.0**-8
_FP32_UNIT_ROUNDOFF = 2.0**-24
_FP64_UNIT_ROUNDOFF = 2.0**-53
# Unit roundoff of the terms of a float32 product under torch.get_float32_matmul_precision():
# "high" allows TF32 (10 mantissa bits), "medium" bfloat16.
_MATMUL_UNIT_ROUNDOFF = {"highest": _FP32_UNIT_ROUNDOFF, "high": 2.0**-11, "medium": 2.0**-8}
# "auto" screens with bfloat16 only where a row keeps at most this fraction of the gallery: the
# exact rescoring of the survivors must stay much cheaper than the float32 product it replaces.
_PREFILTER_MAX_DEPTH_FRACTION = 1 / 16
# ... and where the gallery has at least this many items (below, fixed costs outweigh the gain).
_PREFILTER_MIN_GALLERY = 2**14
# Screened queries rescored together: one float32 product against the union of their survivors'
# columns (fewer rows: a smaller union but a less efficient product; 24-32 measured best at 50k
# on a quiet machine, 10.2-11.0 s against 10.5-11.8 s at 64 and 11.3 s at 128).
_RESCORE_ROWS = 32


class PrecisionAtKCalculator(AccuracyCalculator):
    r"""PML ``AccuracyCalculator`` with ProtoOT's micro precision at k, exact and memory-bounded.

    For every ``k`` in ``k_values`` it adds the metric ``precision_at_{k}``, ProtoOT's
    definition: with :math:`R_q` the number of gallery items of query :math:`q`'s class and
    :math:`\mathrm{hits}_q(m)` the relevant items among its top :math:`m`,

    .. math::

        P@k = \frac{\sum_q \mathrm{hits}_q(\min(k, R_q))}{\sum_q \min(k, R_q)}

    (a micro average over queries). At ``k = 1`` it equals PML's ``precision_at_1`` on
    L2-normalised embeddings (as PML's testers pass them): PML ranks raw vectors by L2
    distance, this calculator by cosine, and the two orders agree only on unit vectors.
    PML's ``r_precision``, ``mean_average_precision_at_r``, ``mean_average_precision``
    (at full depth, i.e. PML with ``k=None``), ``mean_reciprocal_rank``, ``NMI`` and ``AMI``
    stay available through ``include=``/``exclude=``; all ranking metrics of one call share
    one pass over the gallery.

    How it ranks: similarity is the inner product of L2-normalised embeddings (cosine;
    ``F.normalize``, as in PML, so rows of norm below 1e-12, or of float32 norm past about
    1.8e19, do not reach unit length), the ProtoOT protocol, in float32 (float64 when query
    or gallery is float64: both are promoted to one dtype with ``torch.promote_types``);
    ties are broken by gallery index (similarity descending, index ascending),
    deterministically. "Exact" means exact for the float32 similarities ``torch.mm``
    computes: their last bit can depend on the product's shape, so two float32
    implementations may order a near-tie differently. Identical gallery rows (duplicate
    images, a collapsed model) tie exactly all the same: each copy takes the largest of the
    copies' similarities, so a model that maps everything to one point scores as its gallery
    order, not better. The gallery is grouped by class so that a query's relevant items are
    one block of columns, and queries of one class are processed in chunks of at most ``C``
    rows: their relevant block first, then the other gallery columns in cache-sized tiles.
    Every item at or above a per-query threshold (a little below the ``depth``-th
    similarity, estimated from a gallery sample) is kept and the kept items are ranked
    exactly with one integer sort per row; rows whose threshold turns out too high are
    ranked again over the whole gallery, so nothing is silently capped as with PML's ``k``.
    ``depth`` comes from the request: max ``k``, ``R`` for R-based metrics;
    ``mean_average_precision`` keeps every relevant item (all of them must be ranked) and
    ``mean_reciprocal_rank`` the first one. Peak memory is bounded by ``chunk_bytes``.

    bfloat16 screening (``prefilter``, float32 rankings on CPU): the other-class tiles are
    first multiplied in bfloat16 (about 2.3x faster than float32 with AVX512-BF16). The
    bfloat16 product :math:`p` of a query row :math:`q` and a gallery row :math:`g`, before its
    output is rounded, is within

    .. math::

        E = |\tilde q - q| \max|\tilde g| + |q| \max|\tilde g - g|
            + \gamma_D (|\tilde q| \max|\tilde g| + |q| \max|g|) + D\,2^{-125}

    of the float32 similarity :math:`s` (:math:`\tilde x` the bfloat16 rounding,
    :math:`\gamma_D = D 2^{-24} / (1 - D 2^{-24})` for float32 accumulation in any order), so
    every item with :math:`s \ge t` has a bfloat16 output at or above the largest bfloat16 value
    below :math:`t - E`. Those items are the only ones rescored, in float32 with the same
    ``torch.mm`` (after raising each threshold to what the screened values say ``depth`` items
    reach), and cut at the threshold exactly: the ranked lists are those of the float32 path.

    Speed (``benchmarks/bench_eval.py``, one thread): the matrix product is the floor of
    any exact method; what remains is one comparison and one selection pass over the
    similarities plus a sort of about ``1.5 R`` items per query. faiss is not used for the
    search: its k-NN with ``k`` near ``R`` measured slower than ``torch.mm`` plus this
    selection (20k x 20k: 3.3 s CPU at k = 560 vs 1.3 s for the product alone), and it does
    not break ties by index.

    Queries whose class has no gallery item (:math:`R_q = 0`, after removing the query
    itself when ``ref_includes_query``) are excluded from every ranking metric and counted in a
    ``UserWarning``; NMI and AMI cluster every query, as PML's do.

    Args:
        k_values: positive integers; one metric ``precision_at_{k}`` each. ``k`` may exceed
            ``R`` or the gallery size (then ``min(k, R) = R``).
        include: tuple or list of metric names to compute (all when empty), as in PML.
        exclude: tuple or list of metric names to skip, as in PML.
        avg_of_avgs: average per class first, then over classes (per-sample metrics: mean of
            class means; ``precision_at_k``: mean of per-class micro averages).
        return_per_class: return a list with one value per query class instead.
        device: where the similarity chunks are computed: a ``torch.device`` or a string such
            as ``"cpu"`` (converted with ``torch.device``); None: PML's default (cuda if
            available).
        chunk_bytes: memory budget for one similarity chunk and its sort (bytes).
        kmeans_func: clustering for ``NMI``/``AMI``, as in PML. ``None``: PML's default faiss
            K-means with ``min_points_per_centroid=1``, which faiss reads only to print a C++
            warning (``WARNING clustering 12 points to 3 centroids: please provide at least
            117 training points``) that no Python filter silences: the same clusters, NMI and
            AMI as PML's, without the noise on small sets.
        progress: show a tqdm bar over query chunks, where stderr is a terminal.
        prefilter: ``"auto"``, ``"bf16"`` or ``None``: screen the other-class columns of
            float32 rankings on CPU with a bfloat16 product before the exact float32 rescoring
            (see above; the ranking is the same). ``"auto"`` does so where the CPU multiplies
            bfloat16 natively (AVX512-BF16 or AMX), the gallery has at least 16384 items and a
            row keeps at most 1/16 of it (full-depth ``mean_average_precision`` keeps nearly
            every item: never screened); ``"bf16"`` wherever the input is float32 (CPU only;
            also slower where bfloat16 is emulated); ``None`` never. The screen pays where the
            float32 product is slow next to the bfloat16 one (an AMD EPYC: 0.88x the float32 path's
            time at 20k x 20k); on an Intel Xeon with AMX its bookkeeping cost more than it saved
            (1.5x at 20k, docs/benchmarks.md): pass ``None`` there.

    Raises:
        ValueError: a ``k`` below 1, an empty ``k_values``, a non-positive ``chunk_bytes``,
            a ``prefilter`` not in ``PREFILTERS``, ``prefilter="bf16"`` with a non-CPU
            ``device``, a ``device`` string that names no device, an ``include``/``exclude``
            name that is no metric of this class, or both ``avg_of_avgs`` and
            ``return_per_class`` (PML's check).
        TypeError: ``k_values`` is not an iterable of integers, ``chunk_bytes`` is not an
            integer, ``include``/``exclude`` is not a tuple or list (a plain string is
            refused), ``avg_of_avgs`` or ``return_per_class`` is not a bool,
            or ``device`` is neither None, a string nor a ``torch.device``.

    Custom metrics: as in PML, a subclass's ``calculate_<name>`` method adds the metric
    ``<name>`` and is called with keyword arguments, ``label_comparison_fn`` (PML's default,
    equality) among them. A subclass's ``calculate_precision_at_{k}`` replaces this class's
    ``precision_at_{k}``.

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
        prefilter: str | None = "auto",
    ):
        self.k_values = _check_k_values(k_values)
        self.chunk_bytes = check_positive_int("chunk_bytes", chunk_bytes)
        self.progress = bool(progress)  # a bar or not: any truthy value, as tqdm takes it
        check_choice("prefilter", prefilter, PREFILTERS)
        self.prefilter = prefilter
        # PML discovers metrics from ``calculate_*`` attributes, so each requested k gets one; not
        # where the class defines it (precision_at_1, a subclass's override): the attribute would hide it.
        for k in self.k_values:  # partials of a method, not closures: the calculator pickles and deep-copies
            if not hasattr(type(self), f"calculate_precision_at_{k}"):
                setattr(self, f"calculate_precision_at_{k}", functools.partial(self._precision_at_k, k))
        super().__init__(
            include=include,
            exclude=exclude,
            avg_of_avgs=check_bool("avg_of_avgs", avg_of_avgs),
            return_per_class=check_bool("return_per_class", return_per_class),
            device=_as_device(device),
            kmeans_func=kmeans_func,
        )
        if kmeans_func is None:  # PML's default: the same clustering, without faiss's small-set warning
            self.kmeans_func = _without_small_set_warning(self.kmeans_func)
        if prefilter == "bf16" and self.device.type != "cpu":
            raise ValueError(f"prefilter='bf16' runs on CPU only, got device={self.device}")

    def requires_knn(self):
        return super().requires_knn() + ["mean_reciprocal_rank"] + [f"precision_at_{k}" for k in self.k_values]

    def check_primary_metrics(self, include=(), exclude=()):
        """PML's check of the constructor's ``include``/``exclude``, which its ``__init__`` runs, with
        messages that name the argument and what was given."""
        for name, names in (("include", include), ("exclude", exclude)):
            _check_metric_names(name, names, self._metric_names())

    def _metric_names(self) -> list[str]:
        """Every metric this class defines, found as PML finds them (``calculate_*`` attributes)."""
        return [name[len("calculate_"):] for name in dir(self) if name.startswith("calculate_")]

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
            query: ``(Q, D)`` embeddings (tensor or array, any float dtype). Query and
                reference may differ in dtype: both are scored in
                ``torch.promote_types`` of the two, with a caller's autocast turned off.
                Tensors that require grad are detached (scoring tracks no gradients).
            query_labels: ``(Q,)`` integer class labels.
            reference: ``(G, D)`` gallery embeddings; ``None`` means the query set itself
                (then ``ref_includes_query`` is forced to True, as in PML).
            reference_labels: ``(G,)`` integer class labels.
            ref_includes_query: the first ``Q`` gallery rows are the queries; each query's
                own row is left out of its ranking and of its ``R``.
            include: tuple or list of metric names for this call only, among those configured
                (all configured when empty).
            exclude: tuple or list of metric names to skip in this call.

        Returns:
            ``{metric_name: float}`` (a list per class with ``return_per_class``); NaN when
            every query has ``R = 0``.

        Raises:
            TypeError: non-tensor/non-float embeddings, non-integer labels, a
                ``ref_includes_query`` that is not a bool, or an ``include``/``exclude`` that
                is not a tuple or list.
            NotImplementedError: a subclass's metric that takes ``knn_labels`` (PML's
                k-nearest-neighbour labels are never computed here).
            ValueError: labels not 1-D, lengths that differ from their embeddings,
                different embedding widths, empty sets, non-finite values, or
                ``ref_includes_query`` with a reference that does not start with the query,
                an ``include`` name that is not a configured metric, or an ``exclude`` name
                that is no metric of this class.
        """
        ref_includes_query = check_bool("ref_includes_query", ref_includes_query)
        # PML drops unknown names and reads a str as its characters: {} or a wrong dict, silently.
        _check_metric_names("include", include, list(self.original_function_dict))  # the configured metrics
        _check_metric_names("exclude", exclude, self._metric_names())  # excluding an unconfigured one is harmless
        if reference is None:
            reference, reference_labels, ref_includes_query = query, query_labels, True
        query, reference = _as_embeddings("query", query), _as_embeddings("reference", reference)
        query, reference = _in_common_dtype(query, reference)
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
            # PML passes it to every metric; the ranking compares labels with PML's default, equality.
            "label_comparison_fn": EQUALITY,
        }
        reads_knn = [name for name in metrics
                     if "knn_labels" in inspect.signature(getattr(self, f"calculate_{name}")).parameters]
        if reads_knn:
            raise NotImplementedError(
                f"metrics {reads_knn} read PML's knn_labels, which this calculator never builds (it ranks every "
                "gallery item exactly, without a k-nearest-neighbour list); compute them with PML's AccuracyCalculator"
            )
        # A caller's autocast would run the similarity products in half precision: the ranking is exact float32.
        with torch.autocast(self.device.type, enabled=False):  # where the ranking runs
            if any(name in self.requires_knn() for name in metrics):
                kwargs.update(
                    self._ranking_statistics(query, query_labels, reference, reference_labels, ref_includes_query)
                )
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
                f"{int((~valid).sum())} of {len(valid)} {NO_CLASS_MATES} and are excluded from every ranking metric",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )
        stats = {"valid_query_labels": query_labels[valid], "relevant_counts": relevant_counts[valid]}
        if not bool(valid.any()):
            return stats
        gallery = _ClassSortedGallery(reference, reference_labels, self.device)
        query = unit_rows(query.to(self.device))  # cosine = inner product
        rows_per_chunk = max(1, min(_MAX_CHUNK_ROWS, self.chunk_bytes // (16 * len(reference))))
        rows_done, per_chunk = [], []
        for rows in progress_bar(list(_class_chunks(query_labels, valid, rows_per_chunk)), "ranking", self.progress):
            own_columns = gallery.position[rows] if ref_includes_query else None
            block = gallery.block(int(query_labels[rows[0]]))
            chunk = _QueryChunk(query[rows.to(query.device)], gallery, block, own_columns)
            per_chunk.append(self._chunk_statistics(chunk, int(relevant_counts[rows[0]])))
            rows_done.append(rows)
        # Chunks follow classes; put the statistics back in query order (that of valid_query_labels).
        order = torch.argsort(torch.cat(rows_done))
        stats.update({name: torch.cat([c[name] for c in per_chunk])[order] for name in per_chunk[0]})
        return stats

    def _chunk_statistics(self, chunk: "_QueryChunk", relevant_count: int) -> dict:
        """Statistics of a chunk of queries of one class.

        Every gallery item at or above a per-query threshold is ranked exactly; the threshold
        is low enough that the ranked list covers what the requested metrics read. Queries
        whose estimated threshold turns out too high are ranked again over the whole gallery.
        """
        metrics = set(self.get_curr_metrics())
        depth = self._required_depth(relevant_count, metrics)
        needs_all_relevant = "mean_average_precision" in metrics
        needs_first_relevant = "mean_reciprocal_rank" in metrics
        relevant = chunk.relevant_similarities
        screen = self._bf16_screening_allowed(chunk.query.dtype) and not needs_all_relevant
        gallery_size = len(chunk.gallery.embeddings)
        screen &= self.prefilter == "bf16" or (
            gallery_size >= _PREFILTER_MIN_GALLERY and depth <= _PREFILTER_MAX_DEPTH_FRACTION * gallery_size
        )
        # The screen reads other-class columns only: a gallery of the queries' class alone has none.
        screen &= chunk.block.stop - chunk.block.start < gallery_size
        if screen:  # the threshold is only an estimate: a bfloat16 sample will do
            sample_query, sample_gallery = chunk.query.bfloat16(), chunk.gallery.embeddings_bf16
        else:
            sample_query, sample_gallery = chunk.query, chunk.gallery.embeddings
        thresholds = _estimated_thresholds(sample_query, sample_gallery, depth).to(relevant.dtype)
        if needs_all_relevant:
            thresholds = torch.minimum(thresholds, relevant.masked_fill(relevant == -math.inf, math.inf).amin(1))
        elif needs_first_relevant:
            thresholds = torch.minimum(thresholds, relevant.amax(1))
        if chunk.gallery.duplicate_groups is not None:
            # Copies of an item score up to a few roundings apart; all of them must be kept to tie.
            thresholds = thresholds - _duplicate_spread(chunk.query)
        if screen:
            # Raising the threshold to what ``depth`` items provably reach would drop the first
            # relevant item that mean_reciprocal_rank needs; it keeps the estimate then.
            candidates = chunk.screened_candidates(thresholds, None if needs_first_relevant else depth)
        else:
            candidates = chunk.candidates(thresholds)
        complete = candidates.counts >= depth
        if needs_all_relevant:
            complete &= candidates.relevant_counts == relevant_count
        if needs_first_relevant:
            complete &= candidates.relevant_counts > 0
        stats = self._list_statistics(candidates, depth, relevant_count, metrics)
        if not bool(complete.all()):
            # Thresholds too high for some queries (rare): rank those over every finite similarity.
            redo = (~complete).cpu()
            lowest = torch.full(
                (int(redo.sum()),), torch.finfo(thresholds.dtype).min, dtype=thresholds.dtype, device=thresholds.device
            )
            redone = self._list_statistics(chunk.subset(redo).candidates(lowest), depth, relevant_count, metrics)
            for name, values in stats.items():
                values[redo] = redone[name]
        return stats

    def _list_statistics(self, candidates: "_Candidates", depth: int, relevant_count: int, metrics: set) -> dict:
        width = None if metrics & set(_FULL_RANKING_METRICS) else depth
        is_relevant = candidates.ranked_relevance(width).cpu()
        return _list_statistics(is_relevant, torch.full((len(is_relevant),), relevant_count), self.k_values)

    def _bf16_screening_allowed(self, dtype: torch.dtype) -> bool:
        """Whether float32 rankings of this call may screen with bfloat16 (``prefilter``)."""
        if self.prefilter is None or dtype != torch.float32 or self.device.type != "cpu":
            return False
        return self.prefilter == "bf16" or _native_bf16_matmul()

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
    def _precision_at_k(self, k: int, query_labels=None, **kwargs):
        """ProtoOT's micro precision at ``k`` (see the class docstring)."""
        if "hits_at_k" not in kwargs or len(kwargs["valid_query_labels"]) == 0:
            return self._nan(query_labels)
        column = self.k_values.index(k)
        denominators = torch.clamp(kwargs["relevant_counts"], max=k).double()
        return self._micro_average(kwargs["hits_at_k"][:, column].double(), denominators, kwargs["valid_query_labels"])

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
def _without_small_set_warning(kmeans_func):
    """PML's default ``FaissKMeans`` with its parameters and ``min_points_per_centroid=1``.

    faiss's ``Clustering::train`` reads ``min_points_per_centroid`` only to print, from C++ (past
    ``logging`` and ``warnings``), ``WARNING clustering N points to K centroids`` when ``N < K * 39``;
    initialisation, iterations and the subsampling above ``K * max_points_per_centroid`` (256) points
    are the same, so are the clusters and NMI/AMI. Anything else is returned as it is.
    """
    if type(kmeans_func) is not FaissKMeans:
        return kmeans_func
    return FaissKMeans(**{**kmeans_func.kwargs, "min_points_per_centroid": 1})


def _check_k_values(k_values) -> tuple[int, ...]:
    try:
        values = tuple(k_values)
    except TypeError as err:
        raise TypeError(f"k_values must be an iterable of positive integers, got {type(k_values).__name__}") from err
    if not values:
        raise ValueError("k_values must hold at least one positive integer, got an empty sequence")
    for k in values:
        check_positive_int("k_values entry", k)
    return tuple(sorted({int(k) for k in values}))


def _check_metric_names(name: str, names, known) -> None:
    """Raise unless ``names`` is a tuple or list of metric names in ``known``, as PML's
    ``check_primary_metrics`` requires, naming the argument and what was given."""
    if not isinstance(names, (tuple, list)):
        raise TypeError(f"{name} must be a tuple or list of metric names, got {names!r}")
    unknown = [metric for metric in names if metric not in known]
    if unknown:
        raise ValueError(f"{name} must name metrics among {sorted(known)}, got unknown {unknown}")


def _as_device(device) -> torch.device | None:
    """``device`` as a ``torch.device`` (None stays PML's default). PML's calculator reads
    ``device.type``, so a string fails there (AttributeError), although torch and PML's trainers
    take one."""
    if device is None or isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a torch.device, a device string such as 'cpu' or None, got {device!r}")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must name a device such as 'cpu' or 'cuda:0', got {device!r}") from err


def _as_embeddings(name, values) -> torch.Tensor:
    """``values`` as a checked ``(N, D)`` float tensor, detached: scoring needs no gradients, and
    the ranking's NumPy selections refuse tensors that require grad."""
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    tensor = check_matrix(name, values)
    if len(tensor) == 0:
        raise ValueError(f"{name} must hold at least one embedding, got shape {tuple(tensor.shape)}")
    return tensor.detach()


def _in_common_dtype(query, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Both embeddings in ``torch.promote_types`` of their dtypes: the similarity product needs
    one dtype, and promoting (not casting down) keeps float64 input's precision."""
    dtype = torch.promote_types(query.dtype, reference.dtype)
    return query.to(dtype), reference.to(dtype)


def _as_labels(name, labels, expected_length, embeddings_name) -> torch.Tensor:
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
        self.embeddings = unit_rows(reference.to(device))[self.ids]
        self._labels = order.values

    @functools.cached_property
    def embeddings_bf16(self) -> torch.Tensor:
        """``(G, D)`` the rows rounded to bfloat16, for the screening product."""
        return self.embeddings.bfloat16()

    @functools.cached_property
    def bf16_rounding_norms(self) -> torch.Tensor:
        """``_bf16_rounding_norms`` of the rows, for the screening's error bound."""
        return _bf16_rounding_norms(self.embeddings)

    @functools.cached_property
    def duplicate_groups(self) -> torch.Tensor | None:
        """``(G,)`` a group number per row, the same for identical rows; None when all rows differ."""
        distinct, groups = torch.unique(self.embeddings, dim=0, return_inverse=True)
        return groups if len(distinct) < len(groups) else None

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


class _QueryChunk:
    """Queries of one class against the class-sorted gallery, similarities computed tile by tile.

    Args:
        query: ``(C, D)`` normalised query rows.
        gallery: the class-sorted gallery.
        block: the gallery columns of the queries' class.
        own_columns: ``(C,)`` each query's own gallery column (left out of its ranking), or None.
    """

    def __init__(self, query, gallery: _ClassSortedGallery, block: slice, own_columns=None):
        self.query, self.gallery, self.block, self.own_columns = query, gallery, block, own_columns

    def subset(self, mask) -> "_QueryChunk":
        own_columns = None if self.own_columns is None else self.own_columns[mask.cpu()]
        return _QueryChunk(self.query[mask.to(self.query.device)], self.gallery, self.block, own_columns)

    @functools.cached_property
    def relevant_similarities(self) -> torch.Tensor:
        """``(C, R_block)`` similarities to the class block; a query's own item is -inf."""
        similarities = self.query @ self.gallery.embeddings[self.block].T
        if self.own_columns is not None:
            rows = torch.arange(len(similarities), device=similarities.device)
            similarities[rows, (self.own_columns - self.block.start).to(similarities.device)] = -math.inf
        return similarities

    def candidates(self, thresholds) -> "_Candidates":
        """Every item at or above its row's threshold: the block first, then the other columns."""
        candidates = _Candidates(self.gallery.ids, len(self.query), self.gallery.duplicate_groups)
        candidates.add(self.relevant_similarities, thresholds, self.block.start, relevant=True)
        for start, products in self._other_class_products(self.query, self.gallery.embeddings):
            candidates.add(products, thresholds, start)
        return candidates

    def _other_class_products(self, query, gallery_embeddings):
        """Yield ``(first column, (C, T) products)`` of ``query`` with the other-class columns of
        ``gallery_embeddings``, tile by tile in one reused buffer (consume each before the next).
        On CPU the tiles are small enough (sized for the float32 chunk) to stay in cache for the
        selection that follows each product."""
        gallery_size = len(gallery_embeddings)
        tile = gallery_size
        if self.query.device.type == "cpu":
            tile = max(1, _CACHE_TILE_BYTES // (self.query.element_size() * len(self.query)))
        buffer = query.new_empty(len(query) * min(tile, gallery_size))
        for start, stop in _tiles(gallery_size, self.block, tile):
            out = buffer[: len(query) * (stop - start)].view(len(query), stop - start)
            yield start, torch.mm(query, gallery_embeddings[start:stop].T, out=out)


    def screened_candidates(self, thresholds, depth: int | None = None) -> "_Candidates":
        """The candidates of :meth:`candidates` with the same float32 values, the other-class
        columns screened by a bfloat16 product first (float32 queries on CPU only).

        Every item whose float32 similarity reaches its row's threshold passes the screen
        (``_bf16_screen_floor``); with ``depth``, the threshold is first raised to what at least
        ``depth`` items almost surely reach (``_likely_reach``), so fewer survivors are rescored.
        The survivors' float32 similarities come from :meth:`_rescored` and are cut at the
        threshold exactly. Rows short of ``depth`` candidates are left to the caller's check.

        Args:
            thresholds: ``(C,)`` float32.
            depth: how many items each row must rank, or None to keep ``thresholds``.
        """
        error = _bf16_product_error(self.query, self.gallery.bf16_rounding_norms)
        floors = _bf16_screen_floor(thresholds, error)
        screened = _Candidates(self.gallery.ids, len(self.query))  # other-class items, bfloat16 values
        for start, products in self._other_class_products(self.query.bfloat16(), self.gallery.embeddings_bf16):
            flat = _flat_at_least_bf16(products, floors)
            values = _take(products.view(torch.int16).reshape(-1), flat).int() << 16  # bfloat16 -> float32 bits
            screened.add_flat(flat, values.view(torch.float32), products.shape[1], start)
        relevant = self.relevant_similarities
        if depth is not None:
            kth = _kth_largest(torch.cat([relevant, screened.padded_values()], 1), depth)
            thresholds = torch.maximum(thresholds, _likely_reach(kth, error))
            floors = _bf16_screen_floor(thresholds, error)
        # NumPy for the per-item work: several times faster than torch indexing on CPU.
        rows, columns = (item.numpy() for item in screened.items())
        survivors = np.flatnonzero(screened.values().numpy() >= floors.numpy()[rows])
        exact = self._rescored(rows[survivors], columns[survivors])
        kept = exact >= thresholds.numpy()[rows[survivors]]
        candidates = _Candidates(self.gallery.ids, len(self.query), self.gallery.duplicate_groups)
        candidates.add(relevant, thresholds, self.block.start, relevant=True)
        candidates.extend(screened, torch.from_numpy(survivors[kept]), torch.from_numpy(exact[kept]))
        return candidates

    def _rescored(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """``(n,)`` float32 similarities of the items ``(rows[i], columns[i])``, ``(n,)`` each.

        Rows are taken ``_RESCORE_ROWS`` at a time, each group multiplied by the union of its
        items' columns: queries of one class share most candidate columns, so this costs a
        fraction of the full product, and it is the same ``torch.mm`` that scores the rest.
        """
        gallery_size = len(self.gallery.embeddings)
        groups = rows // _RESCORE_ROWS
        num_groups = -(-len(self.query) // _RESCORE_ROWS)
        # (group, column) marks: their running count numbers each group's union columns.
        marked = groups * gallery_size + columns
        marks = np.zeros(num_groups * gallery_size, dtype=bool)
        marks[marked] = True
        slots = np.cumsum(marks) - 1
        union = np.flatnonzero(marks)
        group_starts = np.searchsorted(union, np.arange(num_groups + 1) * gallery_size)
        widths = np.diff(group_starts)
        group_rows = np.diff(np.minimum(np.arange(num_groups + 1) * _RESCORE_ROWS, len(self.query)))
        offsets = np.cumsum(group_rows * widths) - group_rows * widths
        products = torch.empty(int((group_rows * widths).sum()), dtype=self.query.dtype)
        for group, (offset, width, count) in enumerate(zip(offsets, widths, group_rows)):
            group_columns = union[group_starts[group] : group_starts[group + 1]] - group * gallery_size
            # index_select: ~4x faster than advanced indexing for this row gather.
            columns_rows = self.gallery.embeddings.index_select(0, torch.from_numpy(group_columns))
            first = group * _RESCORE_ROWS
            out = products[offset : offset + count * width].view(count, width)
            torch.mm(self.query[first : first + count], columns_rows.T, out=out)
        item = offsets[groups] + (rows - groups * _RESCORE_ROWS) * widths[groups] + slots[marked] - group_starts[groups]
        return np.take(products.numpy(), item) + 0.0  # -0.0 -> 0.0, as ``_Candidates.add`` stores them


@functools.cache
def _native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16); False where torch
    cannot say (``torch.cpu.get_capabilities`` is recent): the exact path is never wrong."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:
        return False
    capabilities = get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def _bf16_rounding_norms(rows: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """``(3, n)`` float64 norms of the rows ``r``, of their bfloat16 roundings ``r̃`` and of
    ``r̃ - r`` (``(n, D)`` float32 input), ``block`` rows at a time to bound the float64 copies."""
    norms = []
    for part in rows.split(block):
        exact, rounded = part.double(), part.bfloat16().double()
        norms.append(torch.linalg.vector_norm(torch.stack([exact, rounded, rounded - exact]), dim=2))
    return torch.cat(norms, 1)


def _bf16_product_error(query: torch.Tensor, gallery_norms: torch.Tensor) -> torch.Tensor:
    """``(C,)`` float64 bounds ``E`` on ``|p - s|`` over a gallery, for each query row: ``p`` the
    bfloat16 product before the rounding of its output, ``s`` the float32 product.

    With ``q̃, g̃`` the bfloat16-rounded rows, ``q̃·g̃ - q·g = (q̃ - q)·g̃ + q·(g̃ - g)``, at most
    ``|q̃ - q| |g̃| + |q| |g̃ - g|`` by Cauchy-Schwarz (the rows' actual rounding errors, about
    half the worst case ``u = 2^-8`` per factor on typical rows). Float32 accumulation of D
    terms, in any order, errs by at most ``gamma_D = D 2^-24 / (1 - D 2^-24)`` times the sum of
    the terms' magnitudes: ``gamma_D |q̃| |g̃|`` for ``p`` (its bf16 x bf16 terms are exact in
    float32), ``gamma_D |q| |g|`` for ``s``; flushing subnormals, at most ``D 2^-125``::

        E = |q̃ - q| max|g̃| + |q| max|g̃ - g| + gamma_D (|q̃| max|g̃| + |q| max|g|) + D 2^-125

    padded by 2^-20 relative for the float64 arithmetic that evaluates it and the thresholds.

    Args:
        query: ``(C, D)`` float32.
        gallery_norms: ``_bf16_rounding_norms(gallery)``.
    """
    dim = query.shape[1]
    norm, rounded_norm, rounding_error = _bf16_rounding_norms(query)
    max_norm, max_rounded_norm, max_rounding_error = gallery_norms.amax(1).tolist()
    gamma = dim * _FP32_UNIT_ROUNDOFF / (1 - dim * _FP32_UNIT_ROUNDOFF)
    error = (
        rounding_error * max_rounded_norm
        + norm * max_rounding_error
        + gamma * (rounded_norm * max_rounded_norm + norm * max_norm)
        + dim * 2.0**-125
    )
    return error * (1 + 2.0**-20)


def _bf16_screen_floor(thresholds: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """``(C,)`` float32: the largest bfloat16 values at or below ``thresholds - error``.

    An item with ``s >= t`` has ``q̃·g̃ >= t - E`` before the output rounding, and any rounding
    to bfloat16 that is monotone (nearest, or toward zero) keeps it at or above the largest
    bfloat16 below ``t - E``: comparing the bfloat16 output with this floor loses no item.
    """
    lowered = thresholds.double() - error
    rounded = lowered.to(torch.bfloat16)
    below = torch.nextafter(rounded, torch.full_like(rounded, -math.inf))
    return torch.where(rounded.double() > lowered, below, rounded).float()


def _likely_reach(screened_kth: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """``(C,)`` float32 similarities that the items behind ``screened_kth`` almost surely reach.

    Row values are exact float32 (relevant block) or bfloat16 outputs ``b``, which round
    ``p = q̃·g̃`` to nearest (``|b - p| <= u |b| / (1 - u)``) with ``|p - s| <= E``. Items at or
    above the row's k-th value ``a`` provably reach ``a - u|a| / (1 - u) - E``; half of ``E``
    is used instead, as the bound is seldom approached (the worst case aligns every rounding
    error; on random rows the largest error seen was under a third of ``E``). A row that falls
    short of ``depth`` is caught by the caller's check, so the ranking stays exact either way.
    """
    a = screened_kth.double()
    u = _BF16_UNIT_ROUNDOFF
    return (a - u * a.abs() / (1 - u) - error / 2).float()


def _duplicate_spread(query: torch.Tensor) -> float:
    """How far apart two computed similarities of a query row with identical unit gallery rows
    may lie: each is within ``gamma_D = D u / (1 - D u)`` of the exact value (``u`` the unit
    roundoff of the product, any summation order), so twice that, padded for the rows' norms."""
    dim = query.shape[1]
    if query.dtype == torch.float64:
        u = _FP64_UNIT_ROUNDOFF
    else:
        u = _MATMUL_UNIT_ROUNDOFF.get(torch.get_float32_matmul_precision(), _BF16_UNIT_ROUNDOFF)
    return 2.5 * dim * u / (1 - dim * u)


def _tiles(size: int, skip: slice, tile: int):
    """(start, stop) column ranges of at most ``tile`` covering ``[0, size)`` except ``skip``."""
    for low, high in ((0, skip.start), (skip.stop, size)):
        for start in range(low, high, tile):
            yield start, min(start + tile, high)


def _estimated_thresholds(query: torch.Tensor, gallery: torch.Tensor, depth: int) -> torch.Tensor:
    """A per-query similarity that a little more than ``depth`` gallery items reach, from a sample.

    Every ``stride``-th gallery row is sampled, so that about ``_SAMPLED_HITS`` sampled items lie
    above the row's true cut; the threshold is taken 3 binomial standard deviations further
    down, so it is rarely too high (the caller checks) and rows keep about
    ``depth * (1 + 3 / sqrt(_SAMPLED_HITS))`` candidates; a bit more below ``depth = 8 * _SAMPLED_HITS``,
    where ``_MIN_SAMPLE_STRIDE`` thins the sample. Small depths use a sparser sample and its
    ``depth``-th value (never above the row's own ``depth``-th) for about ``_MIN_CANDIDATES``.

    Args:
        query: ``(C, D)`` normalised queries.
        gallery: ``(G, D)`` normalised gallery.
        depth: how many items must reach the threshold, ``<= G``.

    Returns:
        ``(C,)`` thresholds, the dtype of ``query`` (float32 for bfloat16).
    """
    stride = max(_MIN_SAMPLE_STRIDE, depth // _SAMPLED_HITS, _MIN_CANDIDATES // depth)
    sample = query @ gallery[::stride].T
    if sample.dtype == torch.bfloat16:  # NumPy, which selects on CPU, has no bfloat16
        sample = sample.float()
    expected = depth * sample.shape[1] / len(gallery)
    rank = min(depth, sample.shape[1], math.ceil(expected + 3 * math.sqrt(expected) + 1))
    return _kth_largest(sample, rank)


def _kth_largest(rows: torch.Tensor, k: int) -> torch.Tensor:
    """(C,) k-th largest value of each row (numpy's introselect on CPU: ~10x torch.topk there)."""
    if rows.device.type == "cpu":
        column = rows.shape[1] - k
        return torch.from_numpy(np.partition(rows.numpy(), column, axis=1)[:, column].copy())
    return torch.topk(rows, k, dim=1).values[:, -1]


class _Candidates:
    """Items of ``C`` query rows that reach the rows' thresholds, collected tile by tile.

    Args:
        column_ids: ``(G,)`` gallery index of each column (ties rank by ascending index).
        num_rows: ``C``.
        column_groups: ``(G,)`` equal for identical gallery rows (their items are ranked with
            the largest of their values in the row, exact ties), or None.

    Attributes:
        counts: ``(C,)`` candidates per row.
        relevant_counts: ``(C,)`` relevant candidates per row.
    """

    def __init__(self, column_ids, num_rows: int, column_groups=None):
        self.column_ids, self.column_groups = column_ids, column_groups
        self.counts = torch.zeros(num_rows, dtype=torch.long, device=column_ids.device)
        self.relevant_counts = torch.zeros_like(self.counts)
        # Per tile: flat positions in the tile (row-major), similarities, per-row counts,
        # and per row the offset turning a flat position into a gallery column.
        self._flat, self._values, self._tile_counts, self._column_offsets, self._relevant = [], [], [], [], []

    def add(self, similarities, thresholds, first_column: int, relevant: bool = False) -> None:
        """Keep the items of a ``(C, T)`` tile of columns ``first_column...`` at or above
        ``thresholds``; ``relevant``: the tile holds relevant items only."""
        flat = _flat_at_least(similarities, thresholds)
        # -0.0 -> 0.0: equal as they compare, and the integer keys of the ranking must agree.
        self.add_flat(flat, _take(similarities.reshape(-1), flat) + 0.0, similarities.shape[1], first_column, relevant)

    def add_flat(self, flat, values, width: int, first_column: int, relevant: bool = False) -> None:
        """Keep the items at the ascending flat (row-major) positions ``flat`` of a ``(C, width)``
        tile of columns ``first_column...``, with their ``values``."""
        row_starts = torch.arange(len(self.counts) + 1, device=flat.device) * width
        counts = torch.diff(torch.searchsorted(flat, row_starts))
        relevant_flags = torch.full_like(counts, int(relevant), dtype=torch.int32)
        self._append(flat, values, counts, first_column - row_starts[:-1], relevant_flags)

    def _append(self, flat, values, counts, column_offsets, relevant_flags) -> None:
        """One tile's items: flat positions (ascending), values, ``(C,)`` counts, ``(C,)`` offsets
        from a row's flat position to its gallery column, ``(C,)`` int32 relevant flags."""
        self._flat.append(flat)
        self._values.append(values)
        self._tile_counts.append(counts)
        self._column_offsets.append(column_offsets)
        self._relevant.append(relevant_flags)
        self.counts += counts
        self.relevant_counts += counts * relevant_flags

    def values(self) -> torch.Tensor:
        """``(n,)`` every item's value, in storage order (tile by tile, row by row)."""
        return torch.cat(self._values)

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n,)`` row and ``(n,)`` column (of the class-sorted gallery) of every item, in
        storage order."""
        segment_counts = torch.stack(self._tile_counts).flatten()
        row_ids = torch.arange(len(self.counts), device=segment_counts.device).repeat(len(self._tile_counts))
        columns = torch.cat(self._flat) + _repeat(torch.stack(self._column_offsets).flatten(), segment_counts)
        return _repeat(row_ids, segment_counts), columns

    def padded_values(self) -> torch.Tensor:
        """``(C, L)`` each row's values (any order), ``-inf`` past its items (``L``: the most
        items of a row, at least 1)."""
        width = max(int(self.counts.max()), 1)
        padded = self._values[0].new_full((len(self.counts), width), -math.inf)
        _scatter(padded.view(-1), self._positions(width), self.values())
        return padded

    def extend(self, source: "_Candidates", items: torch.Tensor, values: torch.Tensor) -> None:
        """Add the items of ``source`` (same rows and columns) at the ascending storage
        positions ``items`` (``(m,)``), with new ``values`` (``(m,)``), tile by tile."""
        tile_counts = torch.stack(source._tile_counts)  # (tiles, C)
        segment_ends = torch.cumsum(tile_counts.flatten(), 0)
        segments = torch.searchsorted(segment_ends, items, right=True)
        kept_counts = torch.bincount(segments, minlength=tile_counts.numel()).view(tile_counts.shape)
        per_tile = kept_counts.sum(1).tolist()
        pieces = zip(torch.split(_take(torch.cat(source._flat), items), per_tile), torch.split(values, per_tile))
        for tile, (flat, tile_values) in enumerate(pieces):
            self._append(flat, tile_values, kept_counts[tile], source._column_offsets[tile], source._relevant[tile])

    def ranked_relevance(self, width: int | None = None) -> torch.Tensor:
        """``(C, width)`` bool: is the item at each rank relevant (ranking by similarity
        descending, gallery index ascending; False past a row's candidates). ``width=None``:
        every candidate."""
        full_width = int(self.counts.max())
        width = full_width if width is None else width
        if full_width == 0:  # thresholds nothing reaches (the caller ranks these rows again)
            return torch.zeros((len(self.counts), width), dtype=torch.bool, device=self.counts.device)
        values, segment_counts = self._tied_values(), torch.stack(self._tile_counts).flatten()
        positions = self._positions(full_width)
        if values.dtype == torch.float64 or bool(values.abs().max() >= 1.5):
            return (self._ranked_payload(values, positions, full_width)[:, :width] & 1).bool()
        # (descending value, irrelevant) in one int32: |s| < 2 leaves the value key's top bit free.
        irrelevant = 1 - _repeat(torch.stack(self._relevant).flatten(), segment_counts)
        keys = torch.full((len(self.counts), full_width), _INT32_MAX, dtype=torch.int32, device=values.device)
        _scatter(keys.view(-1), positions, (_descending_key(values).int() << 1) | irrelevant)
        keys = _sort_rows(keys)
        # A relevant and an irrelevant item with equal similarity (keys that differ in the flag
        # only) at or above the cut: their order needs the ids.
        last_value = keys[:, min(width, full_width) - 1, None] >> 1
        tied = (((keys[:, 1:] ^ keys[:, :-1]) == 1) & ((keys[:, :-1] >> 1) <= last_value)).any(1)
        ranked = (keys[:, :width] & 1) == 0
        if bool(tied.any()):
            columns = ranked.shape[1]
            ranked[tied] = (self._ranked_payload_of_rows(values, tied, columns)[:, :columns] & 1).bool()
        return ranked

    def _tied_values(self) -> torch.Tensor:
        """``(n,)`` the items' values in storage order; with ``column_groups``, an item's value is
        the largest among the items of identical gallery rows in its row."""
        values = self.values()
        if self.column_groups is None:
            return values
        rows, columns = self.items()
        _, copies = torch.unique(rows * len(self.column_groups) + self.column_groups[columns], return_inverse=True)
        largest = values.new_full((int(copies.max()) + 1,), -math.inf).scatter_reduce_(0, copies, values, "amax")
        return largest[copies]

    def _positions(self, full_width: int) -> torch.Tensor:
        """Flat position of every item in a ``(C, full_width)`` matrix: row by row, in the
        order the tiles came (any order within a row will do, the rows get sorted)."""
        tile_counts = torch.stack(self._tile_counts)  # (tiles, C)
        earlier = torch.cumsum(tile_counts, 0) - tile_counts
        segment_counts = tile_counts.flatten()
        segment_starts = torch.cumsum(segment_counts, 0) - segment_counts
        rows = torch.arange(len(self.counts), device=tile_counts.device)
        offsets = (rows * full_width + earlier).flatten() - segment_starts
        return torch.arange(int(segment_counts.sum()), device=rows.device) + _repeat(offsets, segment_counts)

    def _ranked_payload(self, values, positions, full_width: int) -> torch.Tensor:
        """``(C, full_width)`` payloads ``(index << 1) | relevant`` in ranking order."""
        segment_counts = torch.stack(self._tile_counts).flatten()
        column_offsets = _repeat(torch.stack(self._column_offsets).flatten(), segment_counts)
        relevant = _repeat(torch.stack(self._relevant).flatten(), segment_counts)
        payload = (self.column_ids[torch.cat(self._flat) + column_offsets] << 1) | relevant
        return _rank_by_value_and_id(values, payload, positions, (len(self.counts), full_width))

    def _ranked_payload_of_rows(self, values, rows, min_width: int) -> torch.Tensor:
        """``(rows.sum(), L)`` payloads as ``_ranked_payload`` gives them, for the rows where
        the bool ``rows`` is True only (``L``: their most candidates, at least ``min_width``).
        Only those rows' items are gathered: the other rows' are never touched."""
        tile_counts = torch.stack(self._tile_counts)  # (tiles, C)
        segment_counts = tile_counts.flatten()
        segment_starts = (torch.cumsum(segment_counts, 0) - segment_counts).view(tile_counts.shape)
        row_ids = torch.nonzero(rows).flatten()
        counts = tile_counts[:, row_ids]  # (tiles, C'), segments in the order the items lie
        starts = segment_starts[:, row_ids].flatten()
        kept_counts = counts.flatten()
        kept_starts = torch.cumsum(kept_counts, 0) - kept_counts
        total = int(kept_counts.sum())
        # Item i of the subset is item (i - kept_start + start) of the full arrays.
        items = torch.arange(total, device=values.device) + _repeat(starts - kept_starts, kept_counts)
        width = max(int(counts.sum(0).max()), min_width)
        earlier = torch.cumsum(counts, 0) - counts
        new_rows = torch.arange(len(row_ids), device=values.device)
        positions = torch.arange(total, device=values.device) + _repeat(
            (new_rows * width + earlier).flatten() - kept_starts, kept_counts
        )
        column_offsets = _repeat(torch.stack(self._column_offsets)[:, row_ids].flatten(), kept_counts)
        relevant = _repeat(torch.stack(self._relevant)[:, row_ids].flatten(), kept_counts)
        flat = _take(torch.cat(self._flat), items)
        payload = (self.column_ids[flat + column_offsets] << 1) | relevant
        return _rank_by_value_and_id(_take(values, items), payload, positions, (len(row_ids), width))


def _rank_by_value_and_id(values, payload, positions, shape) -> torch.Tensor:
    """``(C, L)`` int64 ``payload`` (``(index << 1) | relevant``) in ranking order: similarity
    descending, gallery index ascending; ``_PADDING_PAYLOAD`` (not relevant) past a row's items.

    Args:
        values: ``(n,)`` float32 or float64 similarities.
        payload: ``(n,)`` int64, indices below ``2**31``.
        positions: ``(n,)`` flat positions in the ``shape`` result.
        shape: ``(C, L)``.
    """
    keys = torch.full(shape, _PADDING_KEY, dtype=torch.long, device=values.device)
    if values.dtype == torch.float32:
        # One int64 key per item, (descending value, index, flag): one plain sort ranks exactly.
        keys.view(-1)[positions] = (_descending_key(values) << _PAYLOAD_BITS) | payload
        return _sort_rows(keys) & (2**_PAYLOAD_BITS - 1)
    # float64 values need all 64 bits: order by index, then stably by value.
    keys.view(-1)[positions] = _descending_key(values)
    packed = torch.full_like(keys, _PADDING_PAYLOAD)
    packed.view(-1)[positions] = payload
    by_id = torch.sort(packed, dim=1)
    by_value = torch.sort(keys.gather(1, by_id.indices), dim=1, stable=True).indices
    return by_id.values.gather(1, by_value)


def _descending_key(values: torch.Tensor) -> torch.Tensor:
    """int64 keys whose ascending order is the descending order of the (finite) float values.

    IEEE bits read as a signed integer order positive floats; flipping the magnitude bits of
    negative ones orders those too; bitwise NOT reverses the order. (-0.0 and 0.0 differ.)
    """
    int_dtype = torch.int32 if values.dtype == torch.float32 else torch.int64
    bits = values.view(int_dtype)
    magnitude_mask = torch.iinfo(int_dtype).max
    ascending = bits ^ ((bits >> (bits.element_size() * 8 - 1)) & magnitude_mask)
    return (~ascending).long()


def _flat_at_least(similarities: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) positions where ``similarities[i, j] >= thresholds[i]``
    (numpy on CPU: ~3x torch's comparison and nonzero there)."""
    if similarities.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(similarities.numpy() >= thresholds.numpy()[:, None]))
    return torch.nonzero((similarities >= thresholds[:, None]).flatten()).flatten()


def _flat_at_least_bf16(similarities: torch.Tensor, floors: torch.Tensor) -> torch.Tensor:
    """``_flat_at_least`` for a bfloat16 CPU tile and bfloat16-valued float32 ``floors``.

    With every floor positive the bit patterns compare as int16 (positive bfloat16 order as
    their bits, negative ones and -0.0 are negative int16): half the bytes of a float32 pass.
    """
    if bool((floors > 0).all()):
        floor_bits = (floors.view(torch.int32) >> 16).to(torch.int16)
        return torch.from_numpy(np.flatnonzero(similarities.view(torch.int16).numpy() >= floor_bits.numpy()[:, None]))
    return _flat_at_least(similarities.float(), floors)


def _take(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``values[indices]`` for 1-D tensors (numpy on CPU: ~3x torch indexing there)."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.take(values.numpy(), indices.numpy()))
    return values[indices]


def _scatter(target: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """``target[indices] = values`` for 1-D tensors (numpy on CPU: ~5x torch there)."""
    if target.device.type == "cpu":
        target.numpy()[indices.numpy()] = values.numpy()
    else:
        target[indices] = values


def _repeat(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each ``values[i]`` ``counts[i]`` times (numpy on CPU: ~10x torch there)."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.repeat(values.numpy(), counts.numpy()))
    return torch.repeat_interleave(values, counts)


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
