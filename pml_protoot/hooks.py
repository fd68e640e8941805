"""PML's ``HookContainer`` for ProtoOT: the key encoder is what gets scored, saved and resumed."""
from __future__ import annotations

from pytorch_metric_learning.utils.logging_presets import HookContainer

__all__ = ["ProtoOTHookContainer"]


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

    def save_models_and_eval(self, trainer, dataset_dict, model_folder, test_interval, tester, *args, **kwargs):
        """PML's step with ``tester`` scoring the trainer's key encoder instead of its query encoder."""
        return super().save_models_and_eval(
            trainer, dataset_dict, model_folder, test_interval, _KeyEncoderTester(tester, trainer), *args, **kwargs
        )


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
