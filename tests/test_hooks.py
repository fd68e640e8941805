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


def test_a_new_process_skips_epochs_recorded_under_hashed_group_names(tmp_path):
    """record-keeper hashes group names of over 64 characters (every pair's here) and kept the hash only
    in the hash_map of the process that wrote them: run_tester_separately in a new process (before it
    wrote anything) looked up unhashed tables, found no records, and tested and recorded epoch 2 again."""
    trainer, first_tester, first_hooks = train_with_hooks(tmp_path)
    assert len(first_hooks.record_keeper.hash_map[first_hooks.record_group_name(first_tester, "mean")]) > 64
    keeper = record_keeper.RecordKeeper(record_writer=record_keeper.RecordWriter(folder=str(tmp_path / "records")))
    hooks = ProtoOTHookContainer(keeper)  # a new process: an empty hash_map
    tester = make_tester(end_of_testing_hook=hooks.end_of_testing_hook)
    key_trunk, key_embedder = trainer.key_encoder.module
    assert not hooks.run_tester_separately(tester, domain_datasets(), 2, key_trunk, key_embedder)
    assert hooks.run_tester_separately(tester, domain_datasets(), 3, key_trunk, key_embedder)
    keeper.save_records()
    assert hooks.get_accuracy_history(tester, "mean")["epoch"] == [1, 2, 3]


@pytest.mark.parametrize("missing", ["key_encoder_2.pth", "all ProtoOT files (a PML HookContainer's folder)"])
def test_load_latest_saved_models_refuses_models_without_the_key_encoder(tmp_path, missing):
    """PML's loader only logs a missing file: resuming went on with an untrained key encoder."""
    train_with_hooks(tmp_path)
    for path in (tmp_path / "models").glob("key_encoder_*.pth" if missing.startswith("all") else missing):
        path.unlink()
    hooks = ProtoOTHookContainer(record_keeper.RecordKeeper())
    with pytest.raises(FileNotFoundError, match=r"key_encoder_2\.pth is missing: the models saved as 2 in .* cannot "
                                                r"resume a ProtoOTTrainer without its key_encoder"):
        hooks.load_latest_saved_models(make_trainer("cpu", seed=5), str(tmp_path / "models"))


def test_load_latest_saved_models_of_an_empty_folder_starts_at_epoch_1(tmp_path):
    hooks = ProtoOTHookContainer(record_keeper.RecordKeeper())
    assert hooks.load_latest_saved_models(make_trainer("cpu"), str(tmp_path)) == 1


def test_a_validation_split_the_tester_will_not_report_is_refused_when_the_hook_is_made(tmp_path):
    """PML's container failed with a bare KeyError after the first epoch and the bank filling."""
    hooks = ProtoOTHookContainer(record_keeper.RecordKeeper(), primary_metric="precision_at_1")
    pml_tester = GlobalEmbeddingSpaceTester(accuracy_calculator=AccuracyCalculator(include=("precision_at_1",)))
    with pytest.raises(ValueError, match=r"validation_split_name 'mean' is not among the results keys "
                                         r"GlobalEmbeddingSpaceTester will report for this dataset_dict: \['val'\]"):
        hooks.end_of_epoch_hook(pml_tester, {"val": None}, str(tmp_path))
    hooks.end_of_epoch_hook(pml_tester, {"other": None}, str(tmp_path), splits_to_eval=[("mean", ["other"])])
    pair_hooks = ProtoOTHookContainer(record_keeper.RecordKeeper(), validation_split_name="photo_to_sketch")
    pair_hooks.end_of_epoch_hook(make_tester(), domain_datasets(), str(tmp_path))
    with pytest.raises(ValueError, match=r"'photo_to_sketch' is not among .*: \['mean', 'sketch_to_photo'\]"):
        pair_hooks.end_of_epoch_hook(make_tester(), domain_datasets(), str(tmp_path),
                                     splits_to_eval=[("sketch", "photo")])


def test_only_rank_0_saves_models(tmp_path, monkeypatch):
    """Under torch.distributed every rank runs the hook (the tester is a collective) and holds the same
    models: the others' writes into a shared model folder raced rank 0's."""
    monkeypatch.setattr("pml_protoot.hooks.get_rank", lambda: 1)
    trainer, tester, hooks = train_with_hooks(tmp_path)
    assert hooks.get_accuracy_history(tester, "mean")["epoch"] == [1, 2]  # it tested and recorded
    assert list((tmp_path / "models").iterdir()) == []
