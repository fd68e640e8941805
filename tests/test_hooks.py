"""ProtoOTHookContainer: PML's HookContainer scoring, saving and resuming the momentum key encoder."""
import pytest
import torch
from pytorch_metric_learning.testers import GlobalEmbeddingSpaceTester
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_protoot.hooks import ProtoOTHookContainer
from pml_protoot.testers import CrossDomainTester
from test_trainers import make_trainer, synthetic_features

record_keeper = pytest.importorskip("record_keeper", reason="record-keeper (test extras) drives PML's HookContainer")


def domain_datasets():
    features, classes, domains = synthetic_features()
    return {name: torch.utils.data.TensorDataset(features[domains == slot], classes[domains == slot])
            for slot, name in enumerate(("photo", "sketch"))}


def make_tester(**kwargs):
    return CrossDomainTester(pair_separator="_to_", progress=False, dataloader_num_workers=0, batch_size=32, **kwargs)


def train_with_hooks(folder, epochs=2):
    keeper = record_keeper.RecordKeeper(record_writer=record_keeper.RecordWriter(folder=str(folder / "records")))
    hooks = ProtoOTHookContainer(keeper)
    tester = make_tester(end_of_testing_hook=hooks.end_of_testing_hook)
    trainer = make_trainer("cpu")
    trainer.end_of_epoch_hook = hooks.end_of_epoch_hook(tester, domain_datasets(), str(folder / "models"))
    trainer.train(num_epochs=epochs)
    return trainer, tester, hooks


def test_the_hook_scores_the_key_encoder_not_the_query_encoder(tmp_path):
    trainer, tester, hooks = train_with_hooks(tmp_path)
    key_trunk, key_embedder = trainer.key_encoder.module
    by_key = make_tester().test(domain_datasets(), 2, key_trunk, key_embedder)
    by_query = make_tester().test(domain_datasets(), 2, trainer.models["trunk"], trainer.models["embedder"])
    metric = "mean_average_precision_at_r"
    assert by_key["mean"][metric] != by_query["mean"][metric]  # the two encoders do score differently here
    for pair, metrics in by_key.items():
        assert tester.all_accuracies[pair][metric] == metrics[metric], pair
    assert hooks.get_curr_primary_metric(tester, "mean") == by_key["mean"]["precision_at_15"]


def test_load_latest_saved_models_restores_the_key_encoder_and_memory(tmp_path):
    trainer, _, _ = train_with_hooks(tmp_path)
    fresh = make_trainer("cpu", seed=5)
    hooks = ProtoOTHookContainer(record_keeper.RecordKeeper())
    assert hooks.load_latest_saved_models(fresh, str(tmp_path / "models"), device=torch.device("cpu")) == 3
    for name in ("key_encoder", "memory"):  # the memory comes back with the ProtoOTLoss that holds it
        saved, restored = getattr(trainer, name).state_dict(), getattr(fresh, name).state_dict()
        assert saved.keys() == restored.keys()
        for key, value in saved.items():
            assert torch.equal(restored[key], value), (name, key)
    assert torch.equal(fresh.models["embedder"][0].weight, trainer.models["embedder"][0].weight)  # PML's part


def test_protoot_modules_hold_the_memory_only_where_no_loss_or_miner_saves_it():
    assert list(make_trainer("cpu").protoot_modules) == ["key_encoder"]  # ProtoOTLoss holds the memory
    assert list(make_trainer("cpu", loss="ntxent").protoot_modules) == ["key_encoder"]  # so does ProtoOTMiner
    plain = make_trainer("cpu", loss="infonce")  # a PML loss, no miner
    assert plain.protoot_modules == {"key_encoder": plain.key_encoder, "memory": plain.memory}


def test_results_keys_sqlite_cannot_name_a_table_are_recorded_and_tracked(tmp_path):
    """The default "->" separator and a domain with a space: record-keeper put them into bare SQLite
    table names (a syntax error at the first save); the container records them under table-safe names."""
    keeper = record_keeper.RecordKeeper(record_writer=record_keeper.RecordWriter(folder=str(tmp_path / "records")))
    hooks = ProtoOTHookContainer(keeper)
    datasets = dict(zip(("photo", "Real World"), domain_datasets().values()))
    tester = CrossDomainTester(progress=False, batch_size=32, end_of_testing_hook=hooks.end_of_testing_hook)
    trainer = make_trainer("cpu")
    trainer.end_of_epoch_hook = hooks.end_of_epoch_hook(tester, datasets, str(tmp_path / "models"))
    trainer.train(num_epochs=2)
    best_epoch, best = hooks.get_best_epoch_and_accuracy(tester, "mean")
    mean = keeper.query(f"SELECT * FROM {hooks.record_group_name(tester, 'mean')}", return_dict=True)
    assert mean["epoch"] == [1, 2] and best == max(mean["precision_at_15"])
    assert best_epoch == mean["epoch"][mean["precision_at_15"].index(best)]
    tables = keeper.query("SELECT name FROM sqlite_master WHERE type='table'", return_dict=True)["name"]
    base = hooks.base_record_group_name(tester)
    recorded = {keeper.hash_map.get(name, name) for name in tables}  # long names are hashed
    recorded = {name for name in recorded if name.startswith(base)}
    assert recorded == {f"{base}_{group}" for group in (
        "PHOTO_REAL_WORLD_vs_REAL_WORLD", "REAL_WORLD_PHOTO_vs_PHOTO", "MEAN_vs_REAL_WORLD_and_PHOTO")}
    assert tester.all_accuracies["photo->Real World"]  # the tester's own keys are unchanged


def test_results_keys_that_would_share_a_table_are_refused():
    hooks = ProtoOTHookContainer(record_keeper.RecordKeeper())
    tester = CrossDomainTester(progress=False)
    tester.reference_split_names = {"a-b->a b": ["a b"], "a b->a-b": ["a-b"]}
    hooks.record_group_name(tester, "a-b->a b")
    with pytest.raises(ValueError, match="results keys 'a-b->a b' and 'a b->a-b' both record as"):
        hooks.record_group_name(tester, "a b->a-b")


def test_run_tester_separately_skips_an_epoch_only_when_every_pair_is_recorded(tmp_path):
    """PML's check looked records up per dataset_dict key (a domain) and raised a KeyError."""
    keeper = record_keeper.RecordKeeper(record_writer=record_keeper.RecordWriter(folder=str(tmp_path / "records")))
    hooks = ProtoOTHookContainer(keeper)
    tester = CrossDomainTester(progress=False, batch_size=32, end_of_testing_hook=hooks.end_of_testing_hook)
    datasets = domain_datasets()
    model = torch.nn.Linear(datasets["photo"][0][0].shape[0], 4)
    assert hooks.run_tester_separately(tester, datasets, 1, model, None)
    keeper.save_records()
    tester.all_accuracies = None
    assert not hooks.run_tester_separately(tester, datasets, 1, model, None)  # recorded: not run again
    assert tester.all_accuracies is None
    assert hooks.run_tester_separately(tester, datasets, 2, model, None)  # another epoch runs
    with_cartoon = {**datasets, "cartoon": datasets["photo"]}
    assert hooks.run_tester_separately(tester, with_cartoon, 1, model, None)  # its pairs are new at epoch 1
    assert len(tester.all_accuracies) == 7  # six ordered pairs and the mean


def test_run_tester_separately_leaves_other_testers_to_pml_and_a_skipped_tester_unchanged(tmp_path):
    keeper = record_keeper.RecordKeeper(record_writer=record_keeper.RecordWriter(folder=str(tmp_path / "records")))
    hooks = ProtoOTHookContainer(keeper, primary_metric="precision_at_1")  # the PML tester's one metric
    pml_tester = GlobalEmbeddingSpaceTester(end_of_testing_hook=hooks.end_of_testing_hook, dataloader_num_workers=0,
                                            accuracy_calculator=AccuracyCalculator(include=("precision_at_1",)))
    datasets = domain_datasets()
    model = torch.nn.Linear(datasets["photo"][0][0].shape[0], 4)
    assert hooks.run_tester_separately(pml_tester, {"val": datasets["photo"]}, 1, model, torch.nn.Identity(),
                                       skip_eval_if_already_done=False)  # PML's check needs a tester that ran
    keeper.save_records()
    assert not hooks.run_tester_separately(pml_tester, {"val": datasets["photo"]}, 1, model, torch.nn.Identity())
    tester = CrossDomainTester(progress=False, batch_size=32, end_of_testing_hook=hooks.end_of_testing_hook)
    assert hooks.run_tester_separately(tester, datasets, 1, model, None)
    keeper.save_records()
    names = tester.reference_split_names
    assert not hooks.run_tester_separately(tester, datasets, 1, model, None)
    assert tester.reference_split_names is names  # the planned test's names stayed off the tester
