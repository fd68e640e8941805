"""Cross-domain retrieval testing: every ordered domain pair, as PML testers do for splits."""
from __future__ import annotations

import logging
import numbers
import re
import warnings
from itertools import permutations

import numpy as np
import torch
from pytorch_metric_learning.testers.base_tester import BaseTester
from pytorch_metric_learning.utils import common_functions as c_f

from ._checks import caller_stacklevel, check_bool
from ._progress import progress_bar
from ._tensors import at_least_float32, cast_floating, floating_dtype, model_device, unit_rows
from .accuracy import NO_CLASS_MATES, PrecisionAtKCalculator, _as_embeddings, _as_labels, _relevant_counts
from .data import _image_and_label, check_no_pil_images
from .distributed import gather_strided, get_rank, get_world_size

__all__ = ["CrossDomainTester"]

logger = logging.getLogger(__name__)

MEAN_KEY = "mean"


class CrossDomainTester(BaseTester):
    r"""Score retrieval from every domain into every other one (ProtoOT's protocol).

    Each domain is embedded once (batched, tqdm bar, on the trunk's device, eval mode,
    ``torch.no_grad``, optional autocast) and L2-normalised; then every ordered pair of
    distinct domains ``(A, B)`` is scored with ``A``'s images as queries and ``B``'s as the
    gallery. Results are keyed ``"A->B"`` (see ``pair_separator``) plus ``"mean"`` (the unweighted mean over pairs),
    each a ``{metric: float}`` dict; ``test`` also stores them, with ``"epoch"``, in
    ``tester.all_accuracies`` so PML's hook containers can track the best epoch; with a
    ``ProtoOTTrainer``, :class:`~pml_protoot.hooks.ProtoOTHookContainer` (``primary_metric=
    "precision_at_15"`` on ``"mean"``), which scores the key encoder. Metric keys are the
    bare metric names.

    Under ``torch.distributed`` (several processes) :meth:`test` splits each domain's
    items over ranks (rank ``r`` embeds items ``r, r + W, ...``), all-gathers embeddings
    and labels back into item order, and every rank scores the full sets (same results
    on every rank); a domain with fewer items than ranks is embedded whole on every rank.

    Args:
        accuracy_calculator: any PML ``AccuracyCalculator``; default
            ``PrecisionAtKCalculator()`` (ProtoOT P@1/5/15 plus PML's metrics).
        pairs: default ``(query_domain, gallery_domain)`` pairs; all ordered pairs when None.
        autocast: run the models under ``torch.autocast`` on their device. Inputs are still cast
            as ``dtype`` says: autocast runs the ops it covers in its own precision whatever their
            inputs' dtype, but leaves float64 tensors alone, so a float64 model needs float64
            inputs (it then runs in float64).
        dtype: a floating ``torch.dtype`` that floating-point trunk inputs are cast to, as in PML's ``BaseTester``;
            when None, the trunk's floating parameter dtype (a float64, bfloat16 or float16
            model just works; inputs of a trunk without floating parameters are left as they
            are). The embedder gets the trunk's outputs in its own floating parameter dtype
            (e.g. a bfloat16 trunk under a float32 head). Integer inputs (``uint8`` images)
            are never cast, unlike PML: ``uint8 -> float`` would keep 0-255 where a model
            expects its own scaling.
        progress: show a tqdm bar while embedding each domain, where stderr is a terminal.
        pair_separator: joins query and gallery domain in the results keys (``"A->B"``).
            record-keeper puts the keys, unquoted, into SQLite table names, where ``->`` is
            a syntax error: :class:`~pml_protoot.hooks.ProtoOTHookContainer` records them
            under table-safe names; with PML's own ``HookContainer`` pass an identifier-safe
            separator such as ``"_to_"`` (and domain names without spaces).
        batch_size, dataloader_num_workers, normalize_embeddings, use_trunk_output,
            data_and_label_getter, end_of_testing_hook: as in PML's ``BaseTester``.
            Datasets return ``(image, class_label)``. ``normalize_embeddings=False`` is refused
            with a ``PrecisionAtKCalculator`` that computes ranking metrics only: it ranks by
            cosine, so the flag would change nothing (its NMI/AMI and custom metrics do read
            the embeddings as given). The hook
            reads ``tester.embeddings_and_labels`` (``{domain: (embeddings as scored, (N, 1)
            labels)}``), as PML's testers leave it. PML's ``data_device``, ``visualizer``,
            ``pca``, ``label_hierarchy_level``, ``set_min_label_to_zero`` and
            ``dataset_labels`` are not taken.

    Raises:
        TypeError: ``dtype`` is not a floating ``torch.dtype``, or a flag (``autocast``,
            ``normalize_embeddings``, ``use_trunk_output``) is not a bool.
        ValueError: a calculator with ``return_per_class``, ``normalize_embeddings=False``
            with a ``PrecisionAtKCalculator`` of ranking metrics only, or an empty ``pair_separator``.

    Example:
        >>> import torch
        >>> from pml_protoot.testers import CrossDomainTester
        >>> tester = CrossDomainTester()
        >>> embeddings = {"photo": torch.eye(3), "sketch": torch.eye(3) + 0.1}
        >>> labels = {"photo": torch.tensor([0, 1, 2]), "sketch": torch.tensor([0, 1, 2])}
        >>> results = tester.evaluate(embeddings, labels)
        >>> sorted(results)
        ['mean', 'photo->sketch', 'sketch->photo']
        >>> results["mean"]["precision_at_1"]
        1.0
    """

    def __init__(
        self,
        accuracy_calculator=None,
        pairs=None,
        autocast: bool = False,
        batch_size: int = 32,
        dataloader_num_workers: int = 2,
        normalize_embeddings: bool = True,
        use_trunk_output: bool = False,
        data_and_label_getter=None,
        end_of_testing_hook=None,
        progress: bool = True,
        pair_separator: str = "->",
        dtype: torch.dtype | None = None,
    ):
        _check_accuracy_calculator(accuracy_calculator)
        super().__init__(  # PML takes any truthy flag: use_trunk_output="False" would skip the embedder
            normalize_embeddings=check_bool("normalize_embeddings", normalize_embeddings),
            use_trunk_output=check_bool("use_trunk_output", use_trunk_output),
            batch_size=batch_size,
            dataloader_num_workers=dataloader_num_workers,
            data_and_label_getter=data_and_label_getter,
            end_of_testing_hook=end_of_testing_hook,
            accuracy_calculator=accuracy_calculator or PrecisionAtKCalculator(),
            dtype=dtype,
        )
        if not self.normalize_embeddings and _ranks_by_cosine_only(self.accuracy_calculator):
            raise ValueError(
                "normalize_embeddings=False would change nothing: PrecisionAtKCalculator ranks by cosine similarity "
                "(it normalises the embeddings itself) and no metric it computes here (NMI, AMI, your own) reads "
                "them raw; to rank raw embeddings by Euclidean distance, pass PML's AccuracyCalculator"
            )
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype (the trunk's inputs are cast to it) or None, "
                            f"got {dtype!r}")
        if getattr(self.accuracy_calculator, "return_per_class", False):
            raise ValueError(
                "accuracy_calculator must give one value per metric (return_per_class=False): the tester "
                "averages each metric over pairs, whose query classes differ; for per-class values call the "
                "calculator on one pair"
            )
        self.pairs = pairs
        self.autocast = check_bool("autocast", autocast)
        self.progress = bool(progress)  # a bar or not: any truthy value, as tqdm takes it
        if not isinstance(pair_separator, str) or not pair_separator:
            raise ValueError(f"pair_separator must be a non-empty string, got {pair_separator!r}")
        self.pair_separator = pair_separator
        self.results = None  # the last test() or evaluate() results
        self.label_levels = [0]

    def pair_key(self, query_domain: str, gallery_domain: str) -> str:
        """The results key of a pair: ``f"{query_domain}{pair_separator}{gallery_domain}"``."""
        return f"{query_domain}{self.pair_separator}{gallery_domain}"

    def test(self, dataset_dict, epoch, trunk_model, embedder_model=None, pairs=None, collate_fn=None) -> dict:
        """Embed each needed domain once and score the pairs.

        ``pairs`` sits where PML testers take ``splits_to_eval``, so HookContainer's
        ``end_of_epoch_hook`` forwards its ``splits_to_eval`` here. PML's
        ``HookContainer.run_tester_separately`` needs ``skip_eval_if_already_done=False``
        (its check looks records up by ``dataset_dict`` key, a domain, while results are
        recorded by pair); :class:`~pml_protoot.hooks.ProtoOTHookContainer`'s checks the pairs.

        Args:
            dataset_dict: ``{domain_name: dataset}``; items are ``(image, class_label)``.
            epoch: stored as ``"epoch"`` in every result dict.
            trunk_model: ``(B, ...) -> (B, F)``; its device is where images go (the embedder's, for a
                trunk without parameters such as ``nn.Identity()`` on cached features).
            embedder_model: ``(B, F) -> (B, D)``; identity when None.
            pairs: ``[(query_domain, gallery_domain), ...]``; ``self.pairs`` or all ordered
                pairs when None.
            collate_fn: passed to the DataLoader.

        Returns:
            ``tester.all_accuracies``: ``{"A->B": {"epoch": epoch, metric: value}, ..., "mean": {...}}``.

        Raises:
            TypeError: ``dataset_dict`` is not a dict, a domain's class labels are not
                integers (refused as :meth:`evaluate` refuses them, float labels included), or (with
                the default ``collate_fn`` and ``data_and_label_getter``, checked on each domain's
                first item before embedding) a domain's items are not ``(image, class_label)``
                tuples of one tensor (or array) image and a numeric label: PIL images (build the dataset
                with ``transform=eval_transform(...)``), a training set's two views, the pair swapped, or
                class names as labels.
            ValueError: fewer than two domains, an empty domain, a pair naming an unknown
                domain or the same domain twice, a pair in PML's ``(query, [references])``
                form (write one ``(query, reference)`` pair per reference), or a domain's items
                that are tuples of other length than two.
        """
        if not isinstance(dataset_dict, dict):
            raise TypeError(f"dataset_dict must be a dict {{domain: dataset}}, got {type(dataset_dict).__name__}")
        pairs = self._resolve_pairs(list(dataset_dict), pairs)
        domains = sorted({domain for pair in pairs for domain in pair})
        for name in domains:
            if len(dataset_dict[name]) == 0:
                raise ValueError(f"dataset_dict[{name!r}] must hold at least one item, got an empty dataset")
            if collate_fn is None and self.data_and_label_getter is c_f.return_input:
                # The items as compute_all_embeddings reads their batches, checked before embedding and named by
                # domain: later failures (the default collate, the trunk, PML's label mapping) name neither.
                _check_eval_item(dataset_dict[name][0], f"dataset_dict[{name!r}] items")
        embedder_model = torch.nn.Identity() if embedder_model is None else embedder_model
        trunk_model.eval()
        embedder_model.eval()
        self.data_device = _input_device(trunk_model, embedder_model)
        embeddings, labels = {}, {}
        for name in domains:
            logger.info("Embedding domain %s (%d items)", name, len(dataset_dict[name]))
            # evaluate()'s preparation, named after this method's arguments: a cast would truncate label 0.5
            # to class 0.
            embeddings[name], labels[name] = self._prepared(
                name, *self._embed_domain(dataset_dict[name], trunk_model, embedder_model, collate_fn),
                embeddings_argument=f"the model's embeddings of dataset_dict[{name!r}]",
                labels_argument=f"dataset_dict[{name!r}] labels",
            )
        results = self._score(embeddings, labels, pairs)
        self.all_accuracies = {key: {"epoch": epoch, **metrics} for key, metrics in results.items()}
        self.reference_split_names = self._reference_split_names(pairs)
        if self.end_of_testing_hook:
            # As PML's BaseTester.test leaves them for the hook: the embeddings as scored, (N, 1) labels.
            self.embeddings_and_labels = {name: (values, labels[name][:, None]) for name, values in embeddings.items()}
            try:
                self.end_of_testing_hook(self)
            finally:
                del self.embeddings_and_labels
        return self.all_accuracies

    def _embed_domain(self, dataset, trunk_model, embedder_model, collate_fn):
        """``(N, D)`` embeddings and ``(N,)`` labels of one domain; this rank's strided share, gathered.

        Embeddings are not normalised: :meth:`test` prepares them as :meth:`evaluate` does, once,
        so that ``test`` scores exactly what ``evaluate`` scores of the model's own outputs
        (normalising twice moves float32 values by an ulp, enough to swap near-tied neighbours).
        Labels keep the dtype the dataset gave them: the caller checks them once gathered, so
        that every rank sees the same labels and raises alike (no rank left waiting in a gather).
        """
        total, world_size = len(dataset), get_world_size()
        # A domain smaller than the world would leave a rank an empty share, with no embedding width to
        # gather: every rank then embeds it whole (the same branch on every rank: len is the same).
        sharded = 1 < world_size <= total
        if sharded:
            dataset = torch.utils.data.Subset(dataset, range(get_rank(), total, world_size))
        dataloader = c_f.get_eval_dataloader(dataset, self.batch_size, self.dataloader_num_workers, collate_fn)
        embeddings, labels = self.compute_all_embeddings(dataloader, trunk_model, embedder_model)
        labels = labels[:, 0].to(embeddings.device)
        if not sharded:
            return embeddings, labels
        return gather_strided(embeddings, total), gather_strided(labels, total)

    def evaluate(self, embeddings_by_domain: dict, labels_by_domain: dict, pairs=None) -> dict:
        """Score pairs from embeddings that are already computed (L2-normalised first when
        ``normalize_embeddings``, as :meth:`test` does).

        Args:
            embeddings_by_domain: ``{domain: (N_d, D) tensor}`` of any float dtype; tensors that
                require grad are detached (scoring tracks no gradients). bfloat16 and float16
                ones are scored in float32, float64 ones in float64, as :meth:`test` scores
                a model's outputs.
            labels_by_domain: ``{domain: (N_d,) integer class labels}``, same keys; float
                labels are refused, even whole-valued ones (as :meth:`test` refuses them).
            pairs: as in :meth:`test`.

        Returns:
            ``{"A->B": {metric: float}, ..., "mean": {metric: float}}`` (plain floats for
            ``json``; a metric a pair does not define, as when none of its queries has a
            class-mate in the gallery, is NaN there, which ``json`` writes as ``NaN``, and is
            left out of ``"mean"``); also kept in ``self.results``.

        Raises:
            TypeError, ValueError: missing or extra domains, bad embeddings or labels
                (named by domain), or bad ``pairs``.
        """
        if not isinstance(embeddings_by_domain, dict) or not isinstance(labels_by_domain, dict):
            raise TypeError("embeddings_by_domain and labels_by_domain must be dicts keyed by domain name")
        if set(embeddings_by_domain) != set(labels_by_domain):
            raise ValueError(
                f"embeddings_by_domain and labels_by_domain must have the same domains, got "
                f"{sorted(embeddings_by_domain)} and {sorted(labels_by_domain)}"
            )
        pairs = self._resolve_pairs(list(embeddings_by_domain), pairs)
        embeddings, labels = {}, {}
        for name in {domain for pair in pairs for domain in pair}:
            embeddings[name], labels[name] = self._prepared(
                name, embeddings_by_domain[name], labels_by_domain[name],
                embeddings_argument=f"embeddings_by_domain[{name!r}]", labels_argument=f"labels_by_domain[{name!r}]",
            )
        return self._score(embeddings, labels, pairs)

    def _prepared(self, domain: str, embeddings, labels, embeddings_argument: str, labels_argument: str) -> tuple:
        """One domain's ``(N, D)`` embeddings as scored (:meth:`_as_scored`) and ``(N,)`` checked class labels;
        errors name the caller's ``*_argument``."""
        embeddings = self._as_scored(embeddings_argument, embeddings)
        return embeddings, _as_labels(labels_argument, labels, len(embeddings), f"{domain!r}")

    def _score(self, embeddings: dict, labels: dict, pairs: list) -> dict:
        """The results of ``pairs`` from embeddings as scored (:meth:`_as_scored`) and checked labels."""
        widths = {name: values.shape[1] for name, values in sorted(embeddings.items())}
        if len(set(widths.values())) > 1:
            raise ValueError(f"every domain's embeddings must have the same width D, got {widths}")
        results = {}
        for query_domain, gallery_domain in pairs:
            logger.info("Scoring %s -> %s", query_domain, gallery_domain)
            key = self.pair_key(query_domain, gallery_domain)
            _warn_if_no_class_mates(labels[query_domain], labels[gallery_domain], key)
            with warnings.catch_warnings():  # the calculator's copy of that warning, without the pair's name
                warnings.filterwarnings("ignore", message=rf"\d+ of \d+ {re.escape(NO_CLASS_MATES)}")
                accuracies = self.accuracy_calculator.get_accuracy(
                    embeddings[query_domain], labels[query_domain], embeddings[gallery_domain], labels[gallery_domain],
                    False,
                )
            results[key] = {k: _plain(v) for k, v in accuracies.items()}
        results[MEAN_KEY] = _mean_over_pairs(results)
        self.results = results
        logger.info("Cross-domain retrieval:\n%s", self.summary_table(results))
        return results

    def _as_scored(self, argument: str, values) -> torch.Tensor:
        """``(N, D)`` embeddings as they are scored: checked, half precision upcast, then L2-normalised
        when ``normalize_embeddings`` (upcast first: normalising in half precision rounds a second time)."""
        values = _as_embeddings(argument, values)
        return unit_rows(values) if self.normalize_embeddings else at_least_float32(values)

    def summary_table(self, results: dict | None = None) -> str:
        """A plain-text table, one row per pair (and the mean), one column per metric.

        Args:
            results: the output of :meth:`evaluate`/:meth:`test`; the last results when None.

        Returns:
            The table as a string, values as percentages with two decimals.

        Raises:
            ValueError: no results passed and none yet.
        """
        results = self.results if results is None else results
        if results is None:
            raise ValueError("no results yet: call test() or evaluate() first, or pass results")
        metrics = [m for m in next(iter(results.values())) if m != "epoch"]
        width = max(len(key) for key in results)
        cells = {
            key: [f"{100 * values[m]:.2f}" if isinstance(values[m], float) else "-" for m in metrics]
            for key, values in results.items()
        }
        # Each column as wide as its header or its widest value (e.g. a negative AMI).
        widths = [max([len(m)] + [len(row[i]) for row in cells.values()]) for i, m in enumerate(metrics)]
        lines = ["  ".join([f"{'pair':<{width}}"] + [f"{m:>{w}}" for m, w in zip(metrics, widths)])]
        for key, row in cells.items():
            lines.append("  ".join([f"{key:<{width}}"] + [f"{c:>{w}}" for c, w in zip(row, widths)]))
        return "\n".join(lines)

    def accuracies_keyname(self, metric, label_hierarchy_level=0, average=False):
        # Bare metric names, so HookContainer finds ``all_accuracies["mean"][primary_metric]``.
        return f"AVERAGE_{metric}" if average else metric

    def compute_all_embeddings(self, dataloader, trunk_model, embedder_model):
        """``(N, D)`` embeddings and ``(N, 1)`` labels of every batch, in order, without gradients.

        PML's version always draws a tqdm bar; this one follows ``progress``.
        """
        embeddings, labels = [], []
        with torch.no_grad():
            for data in progress_bar(dataloader, "embedding", show=self.progress):
                images, label = _image_and_label(self.data_and_label_getter(data))
                _check_numeric_label("dataset batches", label)  # from a collate_fn or getter of the user's own
                embeddings.append(self.get_embeddings_for_eval(trunk_model, embedder_model, images))
                label = c_f.process_label(label, "all", self.label_mapper)
                labels.append(label.reshape(len(label), -1).to(embeddings[-1].device))
        return torch.cat(embeddings), torch.cat(labels)

    def get_embeddings_for_eval(self, trunk_model, embedder_model, input_imgs):
        """``(B, D)`` embeddings of one batch: floating inputs cast to ``dtype`` (or the trunk's
        floating dtype), the trunk's outputs to the embedder's, half-precision outputs upcast to float32."""
        device = _input_device(trunk_model, embedder_model)
        images = cast_floating(input_imgs.to(device), self.dtype or floating_dtype(trunk_model))
        with torch.autocast(device_type=device.type, enabled=self.autocast):
            trunk_output = trunk_model(images)
            if self.use_trunk_output:
                output = trunk_output
            else:  # e.g. a bfloat16 trunk under a float32 head
                output = embedder_model(cast_floating(trunk_output, floating_dtype(embedder_model)))
        return at_least_float32(output)  # float64 models are scored in float64, as evaluate() scores them

    def _reference_split_names(self, pairs) -> dict:
        """PML's ``reference_split_names`` of a test of ``pairs`` (record group names are made from it)."""
        names = {self.pair_key(query, gallery): [gallery] for query, gallery in pairs}
        names[MEAN_KEY] = sorted({gallery for _, gallery in pairs})
        return names

    def _resolve_pairs(self, domains: list, pairs) -> list[tuple]:
        pairs = self.pairs if pairs is None else pairs
        if isinstance(pairs, str):
            raise ValueError(f"pairs must be a list of (query_domain, gallery_domain) pairs, got the string {pairs!r}")
        if pairs is None:
            if len(domains) < 2:
                raise ValueError(f"cross-domain testing needs at least two domains, got {domains}")
            return list(permutations(domains, 2))
        resolved = []
        for pair in pairs:
            _check_pair(pair, domains)
            resolved.append(tuple(pair))
        if not resolved:
            raise ValueError("pairs must hold at least one (query_domain, gallery_domain) pair, got none")
        return resolved


def _input_device(trunk_model, embedder_model) -> torch.device:
    """Where a batch goes: the trunk's device, else (a trunk without parameters, e.g. ``nn.Identity()`` on
    cached features) the embedder's, else the CPU."""
    for model in (trunk_model, embedder_model):
        if next(model.parameters(), None) is not None:
            return model_device(model)
    return torch.device("cpu")


def _check_accuracy_calculator(accuracy_calculator) -> None:
    """Refuse, at construction rather than after every domain is embedded, what cannot score."""
    if accuracy_calculator is None:
        return
    if isinstance(accuracy_calculator, type):
        raise TypeError(f"accuracy_calculator must be an instance, e.g. {accuracy_calculator.__name__}(), "
                        f"got the class {accuracy_calculator.__name__}")
    if not callable(getattr(accuracy_calculator, "get_accuracy", None)):
        raise TypeError("accuracy_calculator must be an AccuracyCalculator (PrecisionAtKCalculator or PML's), got "
                        f"{type(accuracy_calculator).__name__} {accuracy_calculator!r:.40}")


def _check_eval_item(item, argument: str) -> None:
    """Refuse an item that is not ``(image, class_label)`` with one tensor (or array) image and a numeric
    label (a number, tensor or array; a list of them for PML's label hierarchy): a dataset built without its
    eval transform (PIL images), a training set's two views, the pair swapped, or class names as labels."""
    image, label = _image_and_label(item, argument)
    check_no_pil_images(argument, item)
    if isinstance(image, (tuple, list)):
        raise TypeError(f"{argument} must be (image, class_label) with one image, got {len(image)} "
                        "(a training dataset's views?): test on the images with transform=eval_transform(...)")
    if not isinstance(image, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{argument} must be (image, class_label) with a tensor image first, got "
                        f"{type(image).__name__} {image!r:.40} first")
    _check_numeric_label(argument, label)


def _check_numeric_label(argument: str, label) -> None:
    """Refuse class names as labels in words (PML's label mapping would fail on them in NumPy's)."""
    if not _is_numeric_label(label):
        raise TypeError(f"{argument} must have integer class labels, got {type(label).__name__} {label!r:.40}: "
                        "map class names to integers (e.g. the dataset's class_to_idx)")


def _is_numeric_label(label) -> bool:
    if isinstance(label, (tuple, list)):  # one label per level of PML's label hierarchy
        return len(label) > 0 and all(_is_numeric_label(level) for level in label)
    if isinstance(label, np.ndarray):
        return label.dtype.kind in "biuf"
    return isinstance(label, (numbers.Real, torch.Tensor))


def _check_pair(pair, domains: list) -> None:
    """Refuse anything but a ``(query_domain, gallery_domain)`` pair of two different known domains."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"pairs must hold (query_domain, gallery_domain) pairs, got {pair!r}")
    if isinstance(pair[1], (tuple, list)):
        # PML's splits_to_eval form. Not accepted silently: PML scores a query against the union of its
        # references, this tester scores each pair on its own, so the numbers would differ.
        raise ValueError(
            f"pairs must hold (query_domain, gallery_domain) name pairs, got {tuple(pair)!r}: PML's "
            f"(query_split, [reference_splits]) form is not supported (each pair is scored on its own, not "
            f"against the union of references); write {[(pair[0], gallery) for gallery in pair[1]]!r}"
        )
    unknown = [name for name in pair if name not in domains]
    if unknown:
        raise ValueError(f"pairs names unknown domain(s) {unknown}; known domains are {domains}")
    if pair[0] == pair[1]:
        raise ValueError(f"pairs must name two different domains, got {tuple(pair)!r}")


def _ranks_by_cosine_only(calculator) -> bool:
    """A PrecisionAtKCalculator whose metrics are all rankings, which it computes by cosine whatever
    embeddings it is given (NMI, AMI and custom metrics read them as they come)."""
    return isinstance(calculator, PrecisionAtKCalculator) and set(calculator.get_curr_metrics()) <= set(
        calculator.requires_knn()
    )


def _warn_if_no_class_mates(query_labels: torch.Tensor, gallery_labels: torch.Tensor, pair_key: str) -> None:
    """Warn, naming the pair, at the user's line, when queries have no item of their class in the gallery
    (R = 0, counted as the calculator counts R)."""
    missing = int((_relevant_counts(query_labels, gallery_labels.to(query_labels.device), False) == 0).sum())
    if missing:
        warnings.warn(f"{missing} of {len(query_labels)} {NO_CLASS_MATES} of pair {pair_key}", UserWarning,
                      stacklevel=caller_stacklevel())


def _plain(value):
    """A JSON-friendly Python value (float or list of floats)."""
    array = np.asarray(value, dtype=float)
    return array.tolist() if array.ndim else float(array)


def _mean_over_pairs(per_pair: dict) -> dict:
    """Per metric, the mean over the pairs that define it. A pair none of whose queries has a class-mate in
    its gallery scores NaN (the calculator warns); it is left out, with a warning, rather than making the mean
    NaN, which would also stop a hook container's best-epoch tracking. NaN only where no pair defines it."""
    means, left_out = {}, {}
    for metric in next(iter(per_pair.values())):
        values = np.asarray([scores[metric] for scores in per_pair.values()], dtype=float)
        defined = ~np.isnan(values)
        if defined.any():
            for pair, ok in zip(per_pair, defined.reshape(len(values), -1).all(axis=1)):
                if not ok:
                    left_out.setdefault(pair, []).append(metric)
        with np.errstate(invalid="ignore"):  # 0 / 0: no pair defines it
            means[metric] = _plain(np.where(defined, values, 0.0).sum(axis=0) / defined.sum(axis=0))
    if left_out:  # one warning for the whole mean, not one per metric
        logger.warning("the mean leaves out %s, where these metrics are undefined (NaN): %s", list(left_out), left_out)
    return means
