"""PML's ``HookContainer`` for ProtoOT: the key encoder is what gets scored, saved and resumed."""
from __future__ import annotations

import logging
import os
import re

from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.logging_presets import HookContainer

from .distributed import get_rank
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
    ``checkpoint_dir`` is the exact resume. Record group names that record-keeper hashes
    (over 64 characters) are hashed here too, so a new process finds earlier records.

    Under ``torch.distributed`` every rank needs the hook (the tester all-gathers), each with
    its own record folder; only rank 0 saves models.

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
        from record_keeper.utils import hash_if_too_long  # installed wherever a RecordKeeper is

        name = _table_safe(super().record_group_name(tester, split_name))
        claimed = self._split_of_group.setdefault(name, split_name)
        if claimed != split_name:
            raise ValueError(f"results keys {claimed!r} and {split_name!r} both record as {name!r} (record-keeper "
                             "takes only letters, digits and _ in its table names): rename a domain or pass "
                             "the tester another pair_separator")
        # record-keeper stores a long name hashed; PML found the hash only in this process's hash_map,
        # so a resumed run looked up tables that did not exist, and tested and recorded epochs again.
        hashed = hash_if_too_long(name)
        if hashed != name:
            self.record_keeper.hash_map[hashed] = name  # kept readable in the records' hash_map.json
        return hashed

    def load_latest_saved_models(self, trainer, model_folder, device=None, best=False):
        """PML's, refusing a folder that lacks a ``protoot_modules`` file (``key_encoder_<suffix>.pth``,
        and ``memory_<suffix>.pth`` where no loss or miner holds the memory), e.g. one written by PML's
        container: PML's loader logs a missing file and goes on, here with the key encoder untrained.

        Returns:
            The epoch to resume from: the last saved one plus 1 (1 when nothing is saved).

        Raises:
            FileNotFoundError: the latest saved models have no file for a ``protoot_modules`` entry.
        """
        _, suffix = c_f.latest_version(model_folder, "trunk_*.pth", best=best)
        for name in trainer.protoot_modules if suffix is not None else ():
            path = c_f.modelpath_creator(model_folder, name, suffix)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing: the models saved as {suffix!r} in {model_folder} cannot resume a "
                    f"ProtoOTTrainer without its {name} (a folder of PML's HookContainer has none)"
                )
        return super().load_latest_saved_models(trainer, model_folder, device=device, best=best)

    def end_of_epoch_hook(self, tester, dataset_dict, model_folder, test_interval=1, patience=None,
                          splits_to_eval=None, test_collate_fn=None):
        """PML's, refusing now a ``validation_split_name`` the tester will not report (PML's failed with a
        ``KeyError`` after the first epoch and the bank filling). Under ``torch.distributed`` give it to
        every rank: the tester all-gathers embeddings, so every rank must test."""
        reported = _reported_split_names(tester, dataset_dict, splits_to_eval)
        if self.validation_split_name not in reported:
            raise ValueError(
                f"validation_split_name {self.validation_split_name!r} is not among the results keys "
                f"{type(tester).__name__} will report for this dataset_dict: {sorted(reported)}"
            )
        return super().end_of_epoch_hook(tester, dataset_dict, model_folder, test_interval, patience,
                                         splits_to_eval, test_collate_fn)

    def save_models(self, trainer, model_folder, curr_suffix, prev_suffix=None):
        """PML's, on rank 0 only under ``torch.distributed``: every rank holds the same models, and
        ranks sharing a model folder wrote the same files at once."""
        if get_rank() == 0:
            super().save_models(trainer, model_folder, curr_suffix, prev_suffix)

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
        planned = _PlannedTest(tester, _planned_split_names(tester, dataset_dict, pairs))
        return all(self.get_accuracies_of_epoch(planned, key, epoch) for key in planned.reference_split_names)

    def save_models_and_eval(self, trainer, dataset_dict, model_folder, test_interval, tester, *args, **kwargs):
        """PML's step with ``tester`` scoring the trainer's key encoder instead of its query encoder."""
        return super().save_models_and_eval(
            trainer, dataset_dict, model_folder, test_interval, _KeyEncoderTester(tester, trainer), *args, **kwargs
        )


def _reported_split_names(tester, dataset_dict, splits_to_eval) -> set:
    """The results keys a test of ``dataset_dict`` will give: a :class:`CrossDomainTester`'s pairs and
    ``"mean"``; a PML tester's query splits."""
    if isinstance(tester, CrossDomainTester):
        return set(_planned_split_names(tester, dataset_dict, splits_to_eval))
    return {query for query, _ in splits_to_eval} if splits_to_eval else set(dataset_dict)


def _planned_split_names(tester: CrossDomainTester, dataset_dict, pairs) -> dict:
    """The ``reference_split_names`` a test of ``pairs`` of ``dataset_dict`` would leave on ``tester``."""
    return tester._reference_split_names(tester._resolve_pairs(list(dataset_dict), pairs))


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
