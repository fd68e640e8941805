"""PML's ``HookContainer`` for ProtoOT: the key encoder is what gets scored, saved and resumed."""
from __future__ import annotations

import logging
import re

from pytorch_metric_learning.utils.logging_presets import HookContainer

from .testers import CrossDomainTester

__all__ = ["ProtoOTHookContainer"]

logger = logging.getLogger(__name__)


class ProtoOTHookContainer(HookContainer):
    """PML's ``HookContainer`` for a :class:`~pml_protoot.trainers.ProtoOTTrainer`.

    PML's container scores ``trainer.models["trunk"]`` and ``["embedder"]``, which for
    ProtoOT is the query encoder, and saves ``models``, ``optimizers``, ``lr_schedulers``,
    ``loss_funcs`` and ``mining_funcs`` (the memory with the ``ProtoOTLoss`` or
    ``ProtoOTMiner`` that holds it): its "best" models were not the model ProtoOT
    evaluates, and ``load_latest_saved_models`` left the momentum key encoder at its
    initial weights, so training went on with keys from it against banks written by the
    trained one. This container scores the key encoder (``trainer.key_encoder.module``,
    trunk and embedder) and saves and loads ``trainer.protoot_modules`` with the rest: the
    key encoder (file ``key_encoder_<suffix>.pth`` beside PML's), and the memory when no
    loss or miner holds it. Everything else is PML's: record keeping, best-epoch tracking,
    patience, ``end_of_iteration_hook`` and ``end_of_testing_hook``.

    record-keeper makes each record group name a bare SQLite table name (and a CSV file
    name), where the tester's ``"photo->sketch"`` keys, or domains such as ``"Real World"``,
    are a syntax error at the first save. Here every run of characters other than letters,
    digits and ``_`` in PML's group name becomes ``_`` (``..._PHOTO_SKETCH_vs_SKETCH``); two
    keys that would share a name are refused rather than merged.

    Its resume restores what PML's does (models, optimizers, ...) plus the key encoder,
    not the sampler or RNG states; :meth:`ProtoOTTrainer.load_checkpoint` with
    ``checkpoint_dir`` is the exact resume.

    Args:
        record_keeper: a ``record_keeper.RecordKeeper``, as for PML's container.
        primary_metric: the metric that picks the best epoch (default ``"precision_at_15"``,
            ProtoOT's main metric; PML's default is ``"mean_average_precision_at_r"``).
        validation_split_name: the results key it is read from (default ``"mean"``: the
            :class:`~pml_protoot.testers.CrossDomainTester` mean over domain pairs).
        **kwargs: any other ``HookContainer`` argument (``record_group_name_prefix``,
            ``save_models``, ``log_freq``).

    Example:
        >>> from pml_protoot.hooks import ProtoOTHookContainer
        >>> hooks = ProtoOTHookContainer(record_keeper=None)  # a RecordKeeper in practice
        >>> hooks.primary_metric, hooks.validation_split_name, hooks.saveable_trainer_objects[-1]
        ('precision_at_15', 'mean', 'protoot_modules')
    """

    def __init__(self, record_keeper, primary_metric="precision_at_15", validation_split_name="mean", **kwargs):
        super().__init__(
            record_keeper, primary_metric=primary_metric, validation_split_name=validation_split_name, **kwargs
        )
        self.saveable_trainer_objects = [*self.saveable_trainer_objects, "protoot_modules"]
        self._split_of_group = {}

    def record_group_name(self, tester, split_name):
        """PML's record group name of ``split_name``, made a bare SQLite table name (class docstring).

        Raises:
            ValueError: another split of this container already has the same table-safe name.
        """
        name = _table_safe(super().record_group_name(tester, split_name))
        for hashed, full in self.record_keeper.hash_map.items():  # record-keeper hashes long names
            if full == name:
                name = hashed
                break
        claimed = self._split_of_group.setdefault(name, split_name)
        if claimed != split_name:
            raise ValueError(f"results keys {claimed!r} and {split_name!r} both record as {name!r} (record-keeper "
                             "takes only letters, digits and _ in its table names): rename a domain or pass "
                             "the tester another pair_separator")
        return name

    def run_tester_separately(self, tester, dataset_dict, epoch, trunk, embedder, splits_to_eval=None,
                              collate_fn=None, skip_eval_if_already_done=True):
        """PML's, for a :class:`~pml_protoot.testers.CrossDomainTester`: ``splits_to_eval`` are its
        ``pairs``, and the test is skipped when the epoch's results of every pair and of ``"mean"``
        are recorded (PML's check looked records up per ``dataset_dict`` key, a domain: a KeyError).
        Any other tester gets PML's method.

        Returns:
            True if the tester ran, False if it was skipped.
        """
        if not isinstance(tester, CrossDomainTester):
            return super().run_tester_separately(tester, dataset_dict, epoch, trunk, embedder, splits_to_eval,
                                                 collate_fn, skip_eval_if_already_done)
        if skip_eval_if_already_done and self._epoch_recorded(tester, dataset_dict, epoch, splits_to_eval):
            logger.info("epoch %s is already evaluated", epoch)
            return False
        tester.test(dataset_dict, epoch, trunk, embedder, splits_to_eval, collate_fn)
        return True

    def _epoch_recorded(self, tester, dataset_dict, epoch, pairs) -> bool:
        # Group names are made from the split names this test would leave on the tester; it keeps its own.
        planned = _PlannedTest(tester, tester._reference_split_names(tester._resolve_pairs(list(dataset_dict), pairs)))
        return all(self.get_accuracies_of_epoch(planned, key, epoch) for key in planned.reference_split_names)

    def save_models_and_eval(self, trainer, dataset_dict, model_folder, test_interval, tester, *args, **kwargs):
        """PML's step with ``tester`` scoring the trainer's key encoder instead of its query encoder."""
        return super().save_models_and_eval(
            trainer, dataset_dict, model_folder, test_interval, _KeyEncoderTester(tester, trainer), *args, **kwargs
        )


class _PlannedTest:
    """``tester`` with the ``reference_split_names`` a planned test would leave on it (record group names
    are made from them); every other attribute is the tester's own, which stays unchanged."""

    def __init__(self, tester, reference_split_names):
        self._tester, self.reference_split_names = tester, reference_split_names

    def __getattr__(self, name):
        return getattr(self._tester, name)


class _KeyEncoderTester:
    """``tester`` as PML's ``save_models_and_eval`` sees it: ``test`` gets the key encoder's trunk and
    embedder in place of the models it is passed; every other attribute is the tester's own."""

    def __init__(self, tester, trainer):
        self._tester, self._trainer = tester, trainer

    def test(self, dataset_dict, epoch, trunk_model, embedder_model=None, *args, **kwargs):
        key_trunk, key_embedder = self._trainer.key_encoder.module
        return self._tester.test(dataset_dict, epoch, key_trunk, key_embedder, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tester, name)


def _table_safe(name: str) -> str:
    """``name`` with every run of characters SQLite does not take in a bare table name replaced by ``_``."""
    return re.sub(r"[^0-9A-Za-z_]+", "_", name)
