"""Smoke test of benchmarks/accuracy.py ``--quick`` on a few pacs-mini images per domain."""
import argparse
import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ACCURACY_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"
LIMIT_PER_DOMAIN = 24


def load_accuracy_module():
    spec = importlib.util.spec_from_file_location("benchmark_accuracy", ACCURACY_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def accuracy():
    return load_accuracy_module()


def test_quick_run_writes_every_method_and_direction(accuracy, pacs_mini, tmp_path, device):
    out = tmp_path / "results" / "accuracy"
    payload = accuracy.main([
        "--quick", "--epochs", "2", "--limit-per-domain", str(LIMIT_PER_DOMAIN), "--views", "2",
        "--image-size", "64", "--data", str(pacs_mini), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
        "--device", str(device),
    ])

    written = json.loads(out.with_name("accuracy.json").read_text())
    assert written == json.loads(json.dumps(payload))
    assert written["complete"] is True
    import torch  # the machine names the accelerator, not only "cuda"

    expected_device = f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"
    assert written["machine"].endswith(f"CPUs ({expected_device})")
    query, gallery = accuracy.QUICK_PAIR
    expected_directions = {f"{query}->{gallery}", f"{gallery}->{query}"}
    assert [run["method"] for run in written["runs"]] == list(accuracy.METHODS)
    for run in written["runs"]:
        assert run["train_domains"] == list(accuracy.QUICK_PAIR) and run["seed"] == 0
        assert set(run["directions"]) == expected_directions
        for metrics in run["directions"].values():
            assert set(metrics) == set(accuracy.METRICS)
            assert all(math.isfinite(value) and 0 <= value <= 1 for value in metrics.values()), (run["method"], metrics)
    trained = [run for run in written["runs"] if run["method"] != "raw features"]
    assert all(run["epochs"] == 2 and 0 < run["momentum"] <= 1 for run in trained)
    for run in written["runs"]:  # the phases of a run add up to its wall time
        expected = {"setup", "score"} | ({"first_epoch", "later_epochs"} if run in trained else set())
        assert set(run["phase_s"]) == expected and min(run["phase_s"].values()) >= 0
        assert sum(run["phase_s"].values()) == pytest.approx(run["wall_time_s"], abs=0.05)
    pca_started = {run["method"] for run in trained if run["pca_head"]}
    assert pca_started == {"ProtoOT default", "ProtoOTMiner + NTXentLoss"}  # the package's pipeline only

    markdown = out.with_name("accuracy.md").read_text()
    assert markdown.count("## Domain pairs") == len(accuracy.METRICS)
    assert "jointly" not in markdown  # --quick has no four-domain run
    for method in accuracy.METHODS:
        assert markdown.count(f"| {method} |") == len(accuracy.METRICS)
    assert written["command"] in markdown
    assert "Median seconds per run by phase" in markdown
    assert "principal components (`pca_init_`): ProtoOT default, ProtoOTMiner + NTXentLoss;" in markdown


def test_feature_cache_is_reused(accuracy, pacs_mini, tmp_path):
    options = dict(data=pacs_mini, cache_dir=tmp_path, views=2, image_size=32, limit=8, device="cpu")
    first, _ = accuracy.extract_features(**options)
    second, _ = accuracy.extract_features(**options)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    assert first.views.shape == (2, 8 * len(accuracy.JOINT), accuracy.FEATURE_DIM)
    assert (first.eval == second.eval).all() and (first.views == second.views).all()


def test_cached_features_are_the_trunk_on_images_normalised_as_timms_config_says(accuracy, pacs_mini, tmp_path):
    """The frozen trunk sees images as the CLI feeds them (timm's pretrained config of Lite0), not ImageNet
    mean/std, and the results record it."""
    import timm
    import torch

    from pml_protoot import MultiDomainImageFolder, create_trunk, eval_transform

    features, _ = accuracy.extract_features(pacs_mini, tmp_path, 2, 32, 2, "cpu")
    trunk, _ = create_trunk(accuracy.BACKBONE, weights=accuracy.convert_efficientnet_lite0_weights())
    config = timm.data.resolve_data_config(model=trunk)
    images = accuracy.limit_per_domain(MultiDomainImageFolder(pacs_mini, accuracy.JOINT), 2)
    view = eval_transform(32, config["mean"], config["std"])
    with torch.no_grad():
        expected = trunk.eval()(torch.stack([view(images[i][0]) for i in range(len(images))]))
    torch.testing.assert_close(features.eval, expected, rtol=1e-4, atol=1e-4)
    assert accuracy.NORMALISATION == {"mean": list(config["mean"]), "std": list(config["std"])}


@pytest.mark.filterwarnings("ignore:.*no item of their class")
def test_raw_features_score_as_a_brute_force_search(accuracy, pacs_mini, tmp_path):
    """P@1 of the untrained method equals a plain nearest-neighbour loop over cosine similarities.

    Queries whose class is absent from the gallery are left out, as ProtoOT's protocol does.
    """
    import torch

    features, _ = accuracy.extract_features(pacs_mini, tmp_path, 2, 32, 8, "cpu")
    record = accuracy.run_method(features, accuracy.QUICK_PAIR, "raw features", 0, 1, torch.device("cpu"))
    query, gallery = (features.domains.index(name) for name in accuracy.QUICK_PAIR)
    normalised = torch.nn.functional.normalize(features.eval, dim=1)
    hits = []
    gallery_rows = torch.nonzero(features.domain_ids == gallery).flatten()
    for row in torch.nonzero(features.domain_ids == query).flatten():
        if not bool((features.labels[gallery_rows] == features.labels[row]).any()):
            continue
        nearest = gallery_rows[int(torch.argmax(normalised[gallery_rows] @ normalised[row]))]
        hits.append(bool(features.labels[nearest] == features.labels[row]))
    direction = f"{accuracy.QUICK_PAIR[0]}->{accuracy.QUICK_PAIR[1]}"
    assert record["directions"][direction]["P@1"] == pytest.approx(sum(hits) / len(hits))


def test_pair_tables_use_pair_runs_only(accuracy):
    """A joint run also scores the pairs' directions; the pair table must not take those values."""
    import statistics

    def run(train_domains, seed, value):
        metrics = {metric: value for metric in accuracy.METRICS}
        directions = {direction: metrics for direction in accuracy.direction_names(train_domains)}
        return {"method": "m", "train_domains": list(train_domains), "seed": seed, "directions": directions}

    pair, joint = list(accuracy.PAIRS[0]), list(accuracy.JOINT)
    pair_values, joint_values = [0.2, 0.4], [0.9, 0.7]
    runs = [run(pair, seed, value) for seed, value in enumerate(pair_values)]
    runs += [run(joint, seed, value) for seed, value in enumerate(joint_values)]

    def expected(values):
        return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"

    (pair_row,) = accuracy.summarise(runs, ["m"], [pair], accuracy.direction_names(pair), "P@15")
    assert pair_row == ["m"] + [expected(pair_values)] * 3  # two directions and the mean
    (joint_row,) = accuracy.summarise(runs, ["m"], [joint], accuracy.direction_names(joint), "mAP")
    assert joint_row == ["m"] + [expected(joint_values)] * 13


def fake_run(accuracy, method, seed, values):
    """A pair run of ``method`` whose every metric of direction i is ``values[i]``."""
    pair = list(accuracy.PAIRS[0])
    directions = accuracy.direction_names(pair)
    return {
        "method": method, "train_domains": pair, "seed": seed,
        "directions": {d: {metric: v for metric in accuracy.METRICS} for d, v in zip(directions, values)},
    }


def test_seed_spread_against_plain_statistics(accuracy):
    import statistics

    per_seed = [(0.30, 0.50), (0.36, 0.40), (0.33, 0.42)]
    runs = [fake_run(accuracy, "m", seed, values) for seed, values in enumerate(per_seed)]
    pair = list(accuracy.PAIRS[0])
    (row,) = accuracy.seed_spread(runs, ["m"], [pair], accuracy.direction_names(pair))
    stds = [100 * statistics.stdev(column) for column in zip(*per_seed)]
    mean_std = 100 * statistics.stdev(statistics.mean(values) for values in per_seed)
    expected = [f"{statistics.mean(stds):.1f}", f"{max(stds):.1f}", f"{mean_std:.1f}"]
    assert row == ["m", *expected, *expected]  # P@15 and mAP carry the same fake values
    assert accuracy.seed_spread(runs[:1], ["m"], [pair], accuracy.direction_names(pair)) == []  # one seed: no spread


def test_merge_keeps_the_chosen_methods_runs_of_every_file(accuracy, tmp_path):
    def payload(seeds, methods, command, machine="gpu"):
        runs = [fake_run(accuracy, m, s, (0.1 * s, 0.2)) for s in seeds for m in methods]
        config = {
            "seeds": seeds, "methods": methods, "momentum": {m: 0.99 for m in methods}, "joint": False,
            "pairs": [list(accuracy.PAIRS[0])],
        }
        return {
            "command": command, "machine": machine, "wall_time_s": 60.0, "config": config, "runs": runs,
            "complete": True,
        }

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(payload([0, 1], ["m", "other"], "run a")))
    second.write_text(json.dumps(payload([2], ["m"], "run b")))
    merged = accuracy.merged([json.loads(first.read_text()), json.loads(second.read_text())], ["m"])
    assert [(run["method"], run["seed"]) for run in merged["runs"]] == [("m", 0), ("m", 1), ("m", 2)]
    assert merged["config"]["seeds"] == [0, 1, 2] and merged["config"]["methods"] == ["m"]
    assert merged["command"] == "run a + run b" and merged["wall_time_s"] == 120.0
    assert merged["machine"] == "gpu"  # each machine named once
    # A rerun of one row replaces that row's runs and keeps the others.
    third = payload([0, 1], ["other"], "rerun other", machine="another gpu")
    for run in third["runs"]:
        run["directions"] = {"x->y": {"P@15": 0.9}}
    rerun = accuracy.merged([json.loads(first.read_text()), third], ["m", "other"])
    assert [(run["method"], run["seed"]) for run in rerun["runs"]] == [("m", 0), ("other", 0), ("m", 1), ("other", 1)]
    assert [run["directions"] for run in rerun["runs"] if run["method"] == "other"] == [{"x->y": {"P@15": 0.9}}] * 2
    assert rerun["machine"] == "gpu + another gpu"


def test_merge_refuses_results_of_another_protocol(accuracy):
    def payload(normalisation):
        config = {"seeds": [0], "methods": ["m"], "joint": False, "pairs": [], "normalisation": normalisation}
        return {"command": "run", "machine": "m", "wall_time_s": 1.0, "config": config, "runs": []}

    half = {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert accuracy.merged([payload(half), payload(half)], ["m"])["config"]["normalisation"] == half
    with pytest.raises(SystemExit, match="--merge: .*normalisation None there, .*0.5"):
        accuracy.merged([payload(None), payload(half)], ["m"])


def test_merge_lists_the_pairs_of_every_file_in_the_benchmark_order(accuracy):
    def payload(pairs):
        config = {"seeds": [0], "methods": ["m"], "joint": False, "pairs": [list(p) for p in pairs]}
        return {"command": "run", "machine": "m", "wall_time_s": 1.0, "config": config, "runs": []}

    first, last = accuracy.PAIRS[0], accuracy.PAIRS[-1]
    merged = accuracy.merged([payload([last]), payload([first])], ["m"])
    assert merged["config"]["pairs"] == [list(first), list(last)]


def test_cut_short_tables_hold_the_pairs_every_method_finished(accuracy):
    """Rows compare: a pair only some methods finished is named, not tabulated; a method that never ran
    does not hide the others."""
    first, second = (list(pair) for pair in accuracy.PAIRS[:2])

    def run(method, pair):
        directions = {d: {metric: 0.5 for metric in accuracy.METRICS} for d in accuracy.direction_names(pair)}
        return {"method": method, "train_domains": pair, "seed": 0, "directions": directions}

    runs = [run("a", first), run("b", first), run("a", second)]
    pairs, unfinished = accuracy.tabulated_pairs(runs, ["a", "b", "never ran"], [first, second])
    assert pairs == [first] and unfinished == {tuple(second): ["a"]}
    payload = {
        "command": "cut", "wall_time_s": 1.0, "feature_extraction_s": 0.0, "machine": "m", "complete": False,
        "threads": {"torch_threads": 1}, "runs": runs,
        "config": {
            "methods": ["a", "b", "never ran"], "pairs": [first, second], "seeds": [0, 1, 2], "joint": False,
            "epochs": 1, "cross_domain_start": 0, "momentum": {"a": 0.99}, "jobs": 1, "image_size": 224, "views": 2,
        },
    }
    markdown = accuracy.markdown(payload)
    header = "| method | " + " | ".join(accuracy.direction_names(first)) + " | mean |"
    assert markdown.count(header) == len(accuracy.METRICS) and "| b |" in markdown
    assert f"finished by only some methods: {'+'.join(second)} (a;" in markdown
    assert "Seeds [0]:" in markdown  # the seeds that ran, not the seeds asked for


def test_cut_short_tables_name_the_seeds_they_average_per_method(accuracy):
    """A seed counts where its method finished every tabulated pair: the table of a cut run says which."""
    first, second = (list(pair) for pair in accuracy.PAIRS[:2])

    def run(method, pair, seed):
        directions = {d: {metric: 0.1 * seed for metric in accuracy.METRICS} for d in accuracy.direction_names(pair)}
        return {"method": method, "train_domains": pair, "seed": seed, "directions": directions}

    runs = [run("a", first, 0), run("a", second, 0), run("a", first, 1), run("a", second, 1),
            run("b", first, 0), run("b", second, 0), run("b", first, 1)]  # b's seed 1 lacks the second pair
    directions = [d for pair in (first, second) for d in accuracy.direction_names(pair)]
    assert accuracy.counted_seeds_sentence(runs, ["a", "b", "never ran"], [first, second], directions).endswith(
        "a 0, 1; b 0."
    )
    rows = accuracy.summarise(runs, ["a", "b"], [first, second], directions, "P@15")
    assert rows[0][1] == "5.0 ± 7.1" and rows[1][1] == "0.0"  # b's row is seed 0 alone
    assert accuracy.counted_seeds_sentence([], ["a"], [first], directions) == ""


def test_phase_sentence_gives_each_methods_median_seconds(accuracy):
    runs = [
        {"method": "m", "phase_s": {"setup": setup, "first_epoch": 10.0 * setup}} for setup in (1.0, 2.0, 30.0)
    ] + [{"method": "raw", "phase_s": {"setup": 4.0, "score": 6.0}}, {"method": "old"}]  # old: written before phase_s
    assert accuracy.phase_sentence(runs, ["raw", "m", "old"]).endswith(
        "raw: setup 4, score 6; m: setup 2, first epoch 20.\n"
    )


def test_tasks_go_seed_by_seed_then_method_by_method(accuracy):
    """A run cut short keeps whole seeds first, then whole methods; raw features run with the first seed."""
    pairs = [("a", "b"), ("c", "d")]
    tasks = accuracy.make_tasks([3, 4], ["raw features", "ProtoOT default"], pairs)
    assert tasks == [
        (("a", "b"), 3, "raw features"), (("c", "d"), 3, "raw features"),
        (("a", "b"), 3, "ProtoOT default"), (("c", "d"), 3, "ProtoOT default"),
        (("a", "b"), 4, "ProtoOT default"), (("c", "d"), 4, "ProtoOT default"),
    ]


class FakeRuns:
    """``run_method`` without training: records each task and scores it ``score``; raises
    ``KeyboardInterrupt`` (the session's time ran out) once ``stop_after`` tasks have finished."""

    def __init__(self, accuracy, monkeypatch, score=0.5, stop_after=None):
        self.accuracy, self.score, self.stop_after, self.finished = accuracy, score, stop_after, []
        monkeypatch.setattr(accuracy, "extract_features", lambda *args: (None, 0.0))
        monkeypatch.setattr(accuracy, "run_method", self)

    def __call__(self, source, train_domains, method, seed, epochs, device):
        if len(self.finished) == self.stop_after:
            raise KeyboardInterrupt
        self.finished.append((tuple(train_domains), seed, method))
        directions = self.accuracy.direction_names(train_domains)
        return {
            "method": method, "train_domains": list(train_domains), "seed": seed, "epochs": epochs,
            "momentum": None, "pca_head": None, "wall_time_s": 1.0, "phase_s": {"setup": 0.5, "score": 0.5},
            "directions": {d: {metric: self.score for metric in self.accuracy.METRICS} for d in directions},
        }


def task_keys(payload) -> list[tuple]:
    return sorted((tuple(run["train_domains"]), run["seed"], run["method"]) for run in payload["runs"])


CUT_COMMAND = [
    "--pairs", "photo+sketch", "art_painting+sketch", "--no-joint", "--seeds", "0", "1",
    "--methods", "raw features", "ProtoOT default",
]


def test_a_run_cut_short_keeps_every_finished_run_of_the_chosen_pairs(accuracy, tmp_path, monkeypatch):
    """Results are written after every (pair, seed, method) run; --pairs picks the pairs."""
    runs = FakeRuns(accuracy, monkeypatch, stop_after=3)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        accuracy.main([*CUT_COMMAND, "--out", str(out)])
    written = json.loads(out.with_name("cut.json").read_text())
    assert runs.finished == [
        (("photo", "sketch"), 0, "raw features"), (("art_painting", "sketch"), 0, "raw features"),
        (("photo", "sketch"), 0, "ProtoOT default"),
    ]
    assert task_keys(written) == sorted(runs.finished)
    assert not written["complete"] and written["config"]["pairs"] == [["photo", "sketch"], ["art_painting", "sketch"]]


def test_resume_runs_only_the_missing_tasks_and_keeps_the_earlier_runs(accuracy, tmp_path, monkeypatch):
    out = tmp_path / "cut"
    FakeRuns(accuracy, monkeypatch, stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        accuracy.main([*CUT_COMMAND, "--out", str(out)])
    first = json.loads(out.with_name("cut.json").read_text())

    resumed = FakeRuns(accuracy, monkeypatch, score=0.25)  # a later session: its runs score differently
    payload = accuracy.main([*CUT_COMMAND, "--out", str(out), "--resume"])
    assert resumed.finished == [
        (("art_painting", "sketch"), 0, "ProtoOT default"),
        (("photo", "sketch"), 1, "ProtoOT default"), (("art_painting", "sketch"), 1, "ProtoOT default"),
    ]
    written = json.loads(out.with_name("cut.json").read_text())
    assert written == json.loads(json.dumps(payload)) and written["complete"]
    assert task_keys(written) == sorted(task_keys(first) + resumed.finished)
    for run in first["runs"]:  # the earlier runs, unchanged
        assert run in written["runs"]
    assert written["command"] == f"{first['command']} + {first['command']}"  # both sessions' command lines

    nothing_left = FakeRuns(accuracy, monkeypatch)
    assert accuracy.main([*CUT_COMMAND, "--out", str(out), "--resume"]) == written and nothing_left.finished == []


def test_resume_refuses_a_file_made_with_another_protocol_and_starts_one_that_is_missing(
    accuracy, tmp_path, monkeypatch
):
    out = tmp_path / "cut"
    runs = FakeRuns(accuracy, monkeypatch)
    accuracy.main([*CUT_COMMAND, "--out", str(out), "--resume", "--epochs", "3"])  # no file yet: every task
    assert sorted(runs.finished) == task_keys(json.loads(out.with_name("cut.json").read_text()))
    assert len(runs.finished) == 2 + 2 * 2
    with pytest.raises(SystemExit, match="epochs 3 there, 4 here.*cross_domain_start"):
        accuracy.main([*CUT_COMMAND, "--out", str(out), "--resume", "--epochs", "4"])
    assert len(runs.finished) == 6  # nothing ran


@pytest.mark.filterwarnings("ignore:.*no item of their class")
@pytest.mark.parametrize("augment", ["batched", "pil"])
def test_finetune_trains_the_trunk_and_scores_the_key_encoder(accuracy, pacs_mini, tmp_path, device, augment):
    """``--finetune``: the trunk moves from its ImageNet weights (trained end to end); raw features keep them."""
    import torch

    images = accuracy.Images(pacs_mini, 8, 32, 0, None, accuracy.convert_efficientnet_lite0_weights(), augment)
    raw = accuracy.finetune_method(images, accuracy.QUICK_PAIR, "raw features", 0, 1, device)
    trained = accuracy.finetune_method(images, accuracy.QUICK_PAIR, "ProtoOT default", 0, 1, device)
    assert raw.head is None and raw.training_s == {} and isinstance(trained.head, torch.nn.Sequential)
    assert trained.recipe.memory.num_prototypes == 7 and set(trained.eval_sets) == set(accuracy.QUICK_PAIR)
    assert all(len(eval_set) == 8 for eval_set in trained.eval_sets.values())
    assert set(trained.training_s) == {"first_epoch", "later_epochs"} and trained.training_s["later_epochs"] == 0
    raw_state, key_state = raw.trunk.state_dict(), trained.trunk.state_dict()
    for name, value in images.weights.items():
        assert torch.equal(raw_state[name].cpu(), value)
    convolutions = [name for name, value in images.weights.items() if value.dim() == 4]
    still = [name for name in convolutions if torch.equal(key_state[name].cpu(), raw_state[name].cpu())]
    assert convolutions and not still  # every convolution learned, not only BatchNorm statistics

    out = tmp_path / "finetune"
    payload = accuracy.main([
        "--finetune", "--quick", "--epochs", "1", "--limit-per-domain", "8", "--image-size", "32", "--workers", "0",
        "--methods", "raw features", "ProtoOT default", "--data", str(pacs_mini), "--out", str(out),
        "--device", str(device), "--augment", augment,
    ])
    assert payload["complete"] and payload["config"]["finetune"] and payload["config"]["augment"] == augment
    assert [run["method"] for run in payload["runs"]] == ["raw features", "ProtoOT default"]
    markdown = out.with_name("finetune.md").read_text()
    assert "trained end to end" in markdown
    assert ("MoCoV2Augment on each batch on the device, images decoded once at 36 x 36" in markdown) == (augment == "batched")


@pytest.mark.filterwarnings("ignore:.*no item of their class")
def test_finetune_jobs_spawn_processes_that_reproduce_the_one_process_run(accuracy, pacs_mini, tmp_path):
    """``--finetune --jobs 2`` as a user runs it: spawned processes, every task, the same numbers."""
    arguments = [
        "--finetune", "--seeds", "0", "--no-joint", "--epochs", "1", "--limit-per-domain", "8", "--image-size", "32",
        "--workers", "0", "--methods", "raw features", "ProtoOT default", "--data", str(pacs_mini),
    ]
    assert accuracy.start_method(accuracy.Images(pacs_mini, 8, 32, 0, None, {}), accuracy.torch.device("cpu")) == "spawn"
    one_process = accuracy.main([*arguments, "--out", str(tmp_path / "one")])
    subprocess.run(
        [sys.executable, str(ACCURACY_SCRIPT), *arguments, "--jobs", "2", "--out", str(tmp_path / "two")],
        check=True, capture_output=True, cwd=tmp_path,
    )
    two_processes = json.loads((tmp_path / "two.json").read_text())

    def without_times(runs):
        return [{key: value for key, value in run.items() if key not in ("wall_time_s", "phase_s")} for run in runs]

    assert two_processes["complete"] and two_processes["config"]["jobs"] == 2
    assert len(two_processes["runs"]) == 2 * len(accuracy.PAIRS)
    assert without_times(two_processes["runs"]) == without_times(json.loads(json.dumps(one_process["runs"])))


class StartMethodOfEachItem:
    """Item ``i`` is the start method of the process that loads it."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        import multiprocessing

        return multiprocessing.get_start_method()


@pytest.mark.skipif(sys.platform == "win32", reason="no fork on Windows")
def test_job_processes_fork_their_data_loader_workers(accuracy):
    """A spawned ``--jobs`` process inherits ``spawn``: its DataLoaders would re-import the script in fresh
    workers at every pass (22-28 s each on an H200) unless set back to fork."""
    import multiprocessing

    import torch

    before = multiprocessing.get_start_method()
    multiprocessing.set_start_method("spawn", force=True)  # what a spawned process starts with
    try:
        accuracy.fork_data_loader_workers()
        loader = torch.utils.data.DataLoader(StartMethodOfEachItem(), batch_size=2, num_workers=1)
        assert next(iter(loader)) == ["fork", "fork"]
    finally:
        multiprocessing.set_start_method(before, force=True)


ORPHANED_JOBS_SCRIPT = """
import os, sys, time
sys.path.insert(0, {benchmarks!r})
sys.argv = ["accuracy.py"]
import importlib.util
spec = importlib.util.spec_from_file_location("benchmark_accuracy", {script!r})
accuracy = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = accuracy
spec.loader.exec_module(accuracy)

def work(task):
    with open(os.path.join({folder!r}, f"worker{{os.getpid()}}"), "w"):
        pass
    time.sleep(120)  # a long run

if __name__ == "__main__":
    list(accuracy.run_tasks(work, [0, 1], jobs=2, start={start!r}))
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (ended, not yet reaped by whoever adopted it) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


@pytest.mark.skipif(sys.platform == "win32", reason="signals a process by its id")
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_job_processes_end_with_a_parent_killed_alone(tmp_path, start):
    """SIGTERM to the parent alone (``timeout``, ``kill``) must not leave its ``--jobs`` processes training."""
    script = tmp_path / "jobs.py"
    script.write_text(ORPHANED_JOBS_SCRIPT.format(
        benchmarks=str(ACCURACY_SCRIPT.parent), script=str(ACCURACY_SCRIPT), folder=str(tmp_path), start=start
    ))
    parent, workers = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE), []
    try:
        deadline = time.monotonic() + 120
        while len(workers := [int(f.name[6:]) for f in tmp_path.glob("worker*")]) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, parent.stderr.read() if parent.poll() else ""
            time.sleep(0.1)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "a job process outlived its parent"
    finally:
        parent.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.filterwarnings("ignore:.*no item of their class")
def test_finetune_decodes_and_extracts_once_per_pair_for_every_method_and_seed(accuracy, pacs_mini, monkeypatch):
    """The decoded images and the untrained trunk's features are the same for every run on a pair."""
    import torch

    decodes, extractions = [], []
    decoded_two_views, trunk_features = accuracy.DecodedTwoViews, accuracy.trunk_features
    monkeypatch.setattr(accuracy, "DecodedTwoViews", lambda *a: decodes.append(a) or decoded_two_views(*a))
    monkeypatch.setattr(accuracy, "trunk_features", lambda *a, **k: extractions.append(a) or trunk_features(*a, **k))
    images = accuracy.Images(pacs_mini, 8, 32, 0, None, accuracy.convert_efficientnet_lite0_weights())
    features = []
    for method, seed in [("ProtoOT default", 0), ("ProtoOTMiner + NTXentLoss", 1)]:
        accuracy.finetune_method(images, accuracy.QUICK_PAIR, method, seed, 1, "cpu")
        features.append(images.untrained_features(accuracy.QUICK_PAIR, None, None))
    assert len(decodes) == 1 and len(extractions) == 1 and features[0] is features[1]
    fresh_trunk, _ = accuracy.create_trunk(accuracy.BACKBONE, weights=images.weights)
    eval_images = images.dataset(accuracy.QUICK_PAIR)
    eval_images.transform = accuracy.eval_transform(32, **accuracy.NORMALISATION)
    torch.testing.assert_close(features[0], trunk_features(fresh_trunk, eval_images, batch_size=256))


def test_decoded_two_views_hold_each_image_once_as_uint8(accuracy, pacs_mini):
    """Both views of item ``i`` are image ``i`` resized as torchvision's ``Resize`` does it on PIL images."""
    import numpy as np
    import torch
    from PIL import Image

    dataset = accuracy.Images(pacs_mini, 3, 32, 0, None, {}).dataset(accuracy.QUICK_PAIR)
    decoded = accuracy.DecodedTwoViews(dataset, 32)  # decoded at floor(32 * 256 / 224) = 36 px
    assert len(decoded) == len(dataset)
    for index in (0, 4):
        (query, key), returned = decoded[index]
        assert returned == index and torch.equal(query, key)
        assert query.dtype == torch.uint8 and query.shape == (3, 36, 36)
        expected = np.asarray(dataset[index][0].resize((36, 36), Image.BILINEAR))
        assert np.array_equal(query.permute(1, 2, 0).numpy(), expected)


def synthetic_features(accuracy, per_domain):
    """Features of the four domains, ``per_domain`` images each over 3 classes, domains far apart."""
    import torch

    generator = torch.Generator().manual_seed(0)
    n = per_domain * len(accuracy.JOINT)
    domain_ids = torch.arange(len(accuracy.JOINT)).repeat_interleave(per_domain)
    return accuracy.Features(
        list(accuracy.JOINT), domain_ids, torch.arange(n) % 3,
        torch.randn(n, accuracy.FEATURE_DIM, generator=generator) + 3 * domain_ids[:, None],
        torch.randn(2, n, accuracy.FEATURE_DIM, generator=generator),
    )


@pytest.mark.parametrize("method,started", [("ProtoOT default", True), ("ProtoOT official", False)])
def test_package_pipeline_starts_the_head_at_the_centred_features(accuracy, monkeypatch, method, started):
    """The default recipe calls ``pca_init_`` on the domain-centred eval features it trains on; official does not."""
    import torch

    features = synthetic_features(accuracy, per_domain=8)
    calls = []
    monkeypatch.setattr(accuracy, "pca_init_", lambda head, x: calls.append(x.clone()) or head)
    fitted = accuracy.fit_method(features, accuracy.QUICK_PAIR, method, 0, 1, torch.device("cpu"))
    assert bool(calls) == started
    if started:
        torch.testing.assert_close(calls[0], fitted.eval_features)  # what the head sees in training and scoring
        assert calls[0][fitted.domain_ids == 0].mean(0).abs().max() < 1e-5  # centred per domain


def test_holdout_trains_on_half_of_every_domain_class_group(accuracy):
    import torch

    features = synthetic_features(accuracy, per_domain=11)  # classes of 4, 4 and 3 images a domain
    split = accuracy.holdout_split(features)
    assert features.trained is None and split.trained.dtype == torch.bool
    for domain in range(len(accuracy.JOINT)):
        for label in range(3):
            group = (features.domain_ids == domain) & (features.labels == label)
            assert int(split.trained[group].sum()) == int(group.sum()) // 2, (domain, label)
    assert torch.equal(accuracy.holdout_split(features).trained, split.trained)  # fixed, whatever the run seed
    assert not torch.equal(accuracy.holdout_split(features, seed=1).trained, split.trained)


@pytest.mark.parametrize("method", ["ProtoOT default", "raw features, domain-centred", "raw features"])
def test_holdout_scores_only_the_images_the_head_did_not_train_on(accuracy, monkeypatch, method):
    import torch

    features = accuracy.holdout_split(synthetic_features(accuracy, per_domain=20))  # 9 trained a domain: K = 7 fits
    trained_on = []
    real_train_head = accuracy.train_head

    def train_head(recipe, views, eval_features, domain_ids, *args):
        trained_on.append((eval_features, domain_ids, recipe.memory.num_samples))
        return real_train_head(recipe, views, eval_features, domain_ids, *args)

    monkeypatch.setattr(accuracy, "train_head", train_head)
    fitted = accuracy.fit_method(features, accuracy.QUICK_PAIR, method, 0, 1, torch.device("cpu"))

    slots = [accuracy.JOINT.index(name) for name in accuracy.QUICK_PAIR]
    in_pair = torch.isin(features.domain_ids, torch.tensor(slots))
    held_out = torch.nonzero(in_pair & ~features.trained).flatten()
    assert sorted(fitted.rows.tolist()) == held_out.tolist()
    assert torch.equal(fitted.labels, features.labels[fitted.rows])
    expected = features.eval[fitted.rows].clone()
    if method != "raw features":  # centred by the training half's domain means, written plainly
        for position, slot in enumerate(slots):
            training_half = in_pair & features.trained & (features.domain_ids == slot)
            expected[fitted.domain_ids == position] -= features.eval[training_half].mean(0)
    torch.testing.assert_close(fitted.eval_features, expected)
    if method == "ProtoOT default":
        (eval_features, domain_ids, bank_rows), = trained_on
        assert bank_rows == len(eval_features) == int((in_pair & features.trained).sum())
        trained_per_domain = [int((features.trained & (features.domain_ids == slot)).sum()) for slot in slots]
        assert domain_ids.bincount().tolist() == trained_per_domain


def test_holdout_run_says_so_in_its_results(accuracy, pacs_mini, tmp_path):
    out = tmp_path / "holdout"
    payload = accuracy.main([
        "--holdout", "--quick", "--epochs", "1", "--limit-per-domain", str(LIMIT_PER_DOMAIN), "--views", "2",
        "--image-size", "32", "--data", str(pacs_mini), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
        "--methods", "raw features", "ProtoOT default",
    ])
    assert payload["complete"] and payload["config"]["holdout"] is True
    assert "Held out: each head trained on a fixed half" in out.with_name("holdout.md").read_text()
    with pytest.raises(SystemExit, match="holdout True there, False here"):  # --resume keeps the protocol
        accuracy.main(["--quick", "--resume", "--epochs", "1", "--limit-per-domain", str(LIMIT_PER_DOMAIN),
                       "--views", "2", "--image-size", "32", "--data", str(pacs_mini),
                       "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--methods", "raw features"])


def test_holdout_is_a_protocol_setting_and_refuses_finetune(accuracy, capsys):
    here = {"holdout": True}
    assert "holdout False there, True here" in accuracy.protocol_differences({}, here)  # older results: not held out
    assert accuracy.protocol_differences({}, {"holdout": False}) == ""
    with pytest.raises(SystemExit):
        accuracy.main(["--holdout", "--finetune", "--quick"])
    assert "--holdout splits the cached features of a frozen trunk; it does not combine with --finetune" in (
        capsys.readouterr().err)


def load_script(name: str, monkeypatch):
    """A ``benchmarks/`` script as a module, its ``_common`` import resolved as when run as a script."""
    script = ACCURACY_SCRIPT.with_name(f"{name}.py")
    monkeypatch.syspath_prepend(str(script.parent))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_step_times_the_loss_and_the_miner_on_the_memory(monkeypatch):
    """``benchmarks/bench_step.py --loss-only`` on tiny banks: every (method, bank, setting) timed, the miner
    without a neighbour search, ratios against each method's own smallest exact bank."""
    bench_step = load_script("bench_step", monkeypatch)
    written = []
    monkeypatch.setattr(bench_step, "write_results", lambda *result: written.append(result) or ("a.json", "a.md"))
    monkeypatch.setattr(bench_step, "pin_threads", lambda threads: {"torch_threads": threads, "faiss_threads": threads})
    bench_step.main(bench_step.build_parser().parse_args([
        "--loss-only", "--bank-sizes", "40", "80", "--loss-only-steps", "2", "--warmup", "0", "--refresh-every", "2",
        "--neighbour-search", "ivf", "--ivf-nprobe", "2", "--num-prototypes", "3", "--batch-per-domain", "4",
    ]))
    (name, payload, markdown), = written
    rows = list(payload["loss_only"].values())
    assert name == "bench_step" and payload["results"] == {}
    assert sorted((r["method"], r["bank_size"], r["refresh_every"]) for r in rows) == sorted(
        (method, bank, refresh) for method in bench_step.MEMORY_METHODS for bank in (40, 80) for refresh in (1, 2))
    assert all(r["steps"] == 2 and r["mean_s"] > 0 for r in rows)
    for r in rows:
        searched = r["method"] == "ProtoOTLoss"
        assert r["ivf"] == (searched and r["refresh_every"] == 2) and (r["recall_at_1"] is None) != searched
    for method in bench_step.MEMORY_METHODS:
        assert f"| {method} | 40 | 1 | exact |" in markdown
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {method} | 40 | 1 | exact |"))
        assert line.endswith("| 1.00 | 1.00 |")


class MatmulsAndAnExp:
    """A stand-in trainer whose step runs known operators: two matrix products and one exp."""

    def __init__(self):
        import torch

        self.a, self.b = torch.randn(64, 64), torch.randn(64, 64)

    def forward_and_backward(self):
        import torch

        torch.exp(self.a @ self.b @ self.b)


def test_bench_step_profile_counts_each_operator_per_step(monkeypatch):
    import torch

    bench_step = load_script("bench_step", monkeypatch)
    summary = bench_step.profile_steps(MatmulsAndAnExp(), 4, torch.device("cpu"))
    calls = {op["op"]: op["calls"] for op in summary["top_ops"]}
    assert calls["aten::mm"] == 2 and calls["aten::exp"] == 1
    times = [op["ms"] for op in summary["top_ops"]]
    assert times == sorted(times, reverse=True) and len(times) <= bench_step.PROFILED_OPS
    # the listed operators' time is part of all of it (the same numbers summed in another order)
    assert summary["launches"] >= 3 and 0 < sum(times) <= summary["work_ms"] * (1 + 1e-9) <= summary["wall_ms"]


def test_bench_step_profile_on_cuda_sums_kernels_not_the_ranges_around_them(monkeypatch):
    """key_averages() rows as torch gives them on a GPU (stand-ins: this machine has none): kernels and copies
    are CUDA rows; a record_function range such as the optimizer's step also has one, spanning its kernels."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    bench_step = load_script("bench_step", monkeypatch)

    def row(key, device_type, self_device_us, count, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=self_device_us,
                               self_cpu_time_total=0, count=count, is_user_annotation=annotation)

    averages = [
        row("aten::mm", DeviceType.CPU, 300, 4), row("aten::add_", DeviceType.CPU, 100, 2),
        row("ampere_sgemm_128x64", DeviceType.CUDA, 300, 4), row("vectorized_elementwise_kernel", DeviceType.CUDA, 100, 2),
        row("Memcpy HtoD", DeviceType.CUDA, 40, 2),
        row("Optimizer.step#Adam.step", DeviceType.CUDA, 500, 2, annotation=True),
    ]
    summary = bench_step.profile_summary(averages, on_cuda=True, steps=2)
    assert summary["work_ms"] == pytest.approx((300 + 100 + 40) / 1e3 / 2) and summary["launches"] == (4 + 2 + 2) / 2
    assert [op["op"] for op in summary["top_ops"]] == ["aten::mm", "aten::add_"]
    assert summary["top_ops"][0] == {"op": "aten::mm", "ms": 0.15, "calls": 2}


def test_bench_step_profiles_each_trainer_at_the_smallest_bank(monkeypatch):
    """The training-step table on a tiny trunk, then the profile of the trainers at the smallest bank."""
    bench_step = load_script("bench_step", monkeypatch)
    written = []
    monkeypatch.setattr(bench_step, "write_results", lambda name, payload, markdown: written.append(
        (name, json.loads(json.dumps(payload)), markdown)) or ("a.json", "a.md"))  # as written then
    monkeypatch.setattr(bench_step, "pin_threads", lambda threads: {"torch_threads": threads, "faiss_threads": threads})
    bench_step.main(bench_step.build_parser().parse_args([
        "--bank-sizes", "40", "--trainer-bank-sizes", "40", "80", "--image-size", "16", "--batch-per-domain", "4",
        "--steps", "2", "--warmup", "0", "--loss-only-steps", "1", "--refresh-every", "2", "--num-prototypes", "3",
        "--profile-steps", "1",
    ]))
    (_, timed, _), (name, payload, markdown) = written  # the timings are written before the profile runs
    assert "profiles" not in timed and payload["results"] == timed["results"] and name == "bench_step"
    assert set(payload["profiles"]) == {"ntxent", "protoot_bank40_refresh1_exact", "protoot_bank40_refresh2_auto"}
    for profile in payload["profiles"].values():
        assert profile["launches"] > 0 and 0 < profile["work_ms"] <= profile["wall_ms"]
        assert any(op["op"] == "aten::convolution_backward" for op in profile["top_ops"])  # the trunk's
    assert "## Where a step's time goes" in markdown and "| protoot_bank40_refresh2_auto |" in markdown


def test_bench_augment_times_the_pil_and_the_batched_pipeline(monkeypatch):
    """``benchmarks/bench_augment.py`` on four images: both methods timed, the ratio reported."""
    module = load_script("bench_augment", monkeypatch)
    written = []
    monkeypatch.setattr(module, "write_results", lambda *result: written.append(result) or ("a.json", "a.md"))
    arguments = ["--images", "4", "--batch-size", "2", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_augment.py", *arguments])
    # The published table was made with the default options: a smoke run must not replace it unasked.
    with pytest.raises(SystemExit, match=r"bench_augment.json was made by `python benchmarks/bench_augment.py`.*--force"):
        module.main(arguments)
    assert written == []
    payload = module.main([*arguments, "--force"])
    assert [row["method"].split(" ")[0] for row in payload["rows"]] == ["moco_v2_transform", "MoCoV2Augment"]
    assert all(row["items_per_s"] > 0 and math.isclose(row["items_per_s"] * row["ms_per_item"], 1e3)
               for row in payload["rows"])
    (name, written_payload, markdown), = written
    assert name == "bench_augment" and written_payload is payload and "× PIL" in markdown


@pytest.mark.parametrize(
    "arguments, published",
    [([], True), (["--quick"], False), (["--limit-per-domain", "8"], False), (["--finetune"], True),
     (["--finetune", "--quick"], False), (["--holdout"], True), (["--holdout", "--quick"], False)],
)
def test_smoke_runs_do_not_replace_the_published_results(accuracy, arguments, published):
    out = accuracy.default_out(accuracy.build_parser().parse_args(arguments))
    published_out = {"--finetune": accuracy.FINETUNE_OUT, "--holdout": accuracy.HOLDOUT_OUT}
    name = next((published_out[a] for a in arguments if a in published_out), accuracy.DEFAULT_OUT).name
    expected_folder = accuracy.DEFAULT_OUT.parent if published else accuracy.DEFAULT_OUT.parent / "smoke"
    assert out == expected_folder / name
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out) + ".json"], cwd=ACCURACY_SCRIPT.parent)
    if ignored.returncode not in (0, 1):
        pytest.skip("not a git checkout: cannot ask git what it ignores")
    assert (ignored.returncode == 0) == (not published)  # git ignores smoke results, never published ones


def test_top_k_hits_finds_a_wanted_class_by_its_rank(monkeypatch):
    import torch

    module = load_script("lite0_normalisation", monkeypatch)
    logits = torch.arange(10.0).flip(0).repeat(3, 1)  # class c ranks c + 1 in every row
    wanted = [{0}, {3, 9}, {7}]
    assert module.top_k_hits(logits, wanted, 1) == [True, False, False]
    assert module.top_k_hits(logits, wanted, 5) == [True, True, False]


def test_lite0_normalisation_scores_both_normalisations_on_every_domain(monkeypatch, pacs_mini):
    module = load_script("lite0_normalisation", monkeypatch)
    written = []
    monkeypatch.setattr(
        module, "write_results", lambda *result, **options: written.append((result, options)) or ("j", "m")
    )
    payload = module.main(["--data", str(pacs_mini), "--per-class", "1"])
    names = list(module.normalisations())
    assert any("0.5" in name for name in names) and "ImageNet mean/std" in names
    domains = sorted({row["domain"] for row in payload["rows"]})
    assert domains == sorted(p.name for p in pacs_mini.iterdir() if p.is_dir())
    for row in payload["rows"]:
        assert row["images"] == len(module.IMAGENET_CLASSES)  # one image of each class ImageNet has
        assert 0 <= row["top1"] <= row["top5"] <= 1
    ((name, written_payload, markdown), options), = written
    assert name == "lite0_normalisation" and written_payload is payload and options == {"smoke": True}
    assert "| photo | ImageNet mean/std | 4 |" in markdown


def test_lite0_normalisation_refuses_to_replace_the_published_table_with_other_options(monkeypatch, tmp_path):
    """It wrote results/lite0_normalisation.* for any --data, silently replacing the published table."""
    module = load_script("lite0_normalisation", monkeypatch)
    monkeypatch.setattr(module, "lite0_classifier", lambda: pytest.fail("ran before the check"))
    with pytest.raises(SystemExit, match=r"lite0_normalisation\.json was made by .* pass --out NAME"):
        module.main(["--data", str(tmp_path)])


COARSE_IVF = {"neighbour_search": "ivf", "ivf_nlist": 8, "ivf_nprobe": 1, "ivf_buffer_rows": 64}
DEFAULT_ROW_CHANGES = {
    "ProtoOT default, not centred": {"center_domains": False},
    "ProtoOT default, momentum 0.999": {"momentum": 0.999},
    "ProtoOT default, K = 14": {"num_prototypes": 14},
    "ProtoOT default, beta official": {"marginal_rule": "official"},
    "ProtoOT default, beta assignment": {"marginal_rule": "assignment"},
    "ProtoOT default, beta matched": {"marginal_rule": "matched"},
    "ProtoOT default, prototypes reset every epoch": {"reset_prototypes": True},
    "ProtoOT default, random head init": {"pca_head": False},
    "ProtoOT default, row-normalised scores": {"normalize_scores": True},
    "ProtoOT default, epsilon 0.025": {"epsilon": 0.025},
    "ProtoOT default, epsilon 0.05 (the paper's)": {"epsilon": 0.05},
    "ProtoOT default, epsilon 0.2": {"epsilon": 0.2},
    "ProtoOT default, tau 0.1": {"temperature": 0.1},
    "ProtoOT default, tau 0.3": {"temperature": 0.3},
    "ProtoOT default, tau 0.4": {"temperature": 0.4},
    "ProtoOT default, tau 0.4, row-normalised scores": {"temperature": 0.4, "normalize_scores": True},
    "ProtoOT default, no cross-domain term": {"cross_domain_weight": 0.0},
    "ProtoOT default, cross-domain weight 0.1": {"cross_domain_weight": 0.1},
    "ProtoOT default, cross-domain weight 1": {"cross_domain_weight": 1.0},
    "ProtoOT default, cross-domain from epoch 0": {"cross_domain_start_epoch": 0},
    "ProtoOT default, cross-domain from 3/4 of epochs": {"cross_domain_start_epoch": 45},  # of 60
    "ProtoOT default, full OT every 10 steps": {"refresh_every": 10},
    "ProtoOT default, coarse IVF neighbours": COARSE_IVF,
    "ProtoOT default, full OT every 10 steps, coarse IVF neighbours": {"refresh_every": 10, **COARSE_IVF},
}


def recipe_settings(recipe) -> dict:
    loss, memory = recipe.loss, recipe.memory
    return {
        "temperature": loss.temperature,
        "cross_domain_weight": loss.cross_domain_weight,
        "cross_domain_start_epoch": loss.cross_domain_start_epoch,
        "epsilon": memory.epsilon,
        "normalize_scores": memory.normalize_scores,
        "num_prototypes": memory.num_prototypes,
        "marginal_rule": memory.marginal_rule,
        "reset_prototypes": memory.reset_prototypes,
        "refresh_every": memory.refresh_every,
        "neighbour_search": memory.neighbour_search,
        "ivf_nlist": memory.ivf_nlist,
        "ivf_nprobe": memory.ivf_nprobe,
        "ivf_buffer_rows": memory.ivf_buffer_rows,
        "momentum": recipe.momentum,
        "center_domains": recipe.center_domains,
        "pca_head": recipe.pca_head,
    }


def test_every_default_ablation_row_is_checked(accuracy):
    assert set(DEFAULT_ROW_CHANGES) == {name for name in accuracy.ALL_METHODS if name.startswith("ProtoOT default, ")}


def test_the_published_ablation_holds_every_row_for_every_pair_and_seed(accuracy):
    """``--ablation`` runs every ``ABLATIONS`` row: the committed results must show what a rerun would."""
    published = json.loads(accuracy.DEFAULT_OUT.with_name("accuracy_pacs_mini_ablation.json").read_text())
    assert set(accuracy.ABLATIONS) <= set(published["config"]["methods"])
    runs = {(run["method"], tuple(run["train_domains"]), run["seed"]) for run in published["runs"]}
    for method in published["config"]["methods"]:
        seeds = [0] if accuracy.ALL_METHODS[method] is None else [0, 1, 2]  # untrained rows: one run
        missing = [(pair, seed) for pair in accuracy.PAIRS for seed in seeds if (method, pair, seed) not in runs]
        assert not missing, (method, missing)


@pytest.mark.parametrize("row", DEFAULT_ROW_CHANGES)
def test_a_default_ablation_row_changes_only_what_its_name_says(accuracy, row):
    import torch

    domain_ids, epochs = torch.arange(2).repeat_interleave(16), 60
    default = recipe_settings(accuracy.ALL_METHODS["ProtoOT default"](domain_ids, epochs))
    ablated = recipe_settings(accuracy.ALL_METHODS[row](domain_ids, epochs))
    assert default["cross_domain_start_epoch"] == 30  # the paper's 100 of 200 epochs
    assert {key: value for key, value in ablated.items() if value != default[key]} == DEFAULT_ROW_CHANGES[row]


@pytest.mark.parametrize(
    "option, value", [("--seeds", "-1"), ("--epochs", "0"), ("--views", "1"), ("--limit-per-domain", "0"),
                      ("--jobs", "0"), ("--workers", "-1"), ("--epochs", "two")],
)
def test_bad_numbers_are_refused_by_argparse_naming_the_option(accuracy, option, value, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(accuracy, "DEFAULT_OUT", tmp_path / "published")
    monkeypatch.setattr(accuracy, "extract_features", lambda *args: pytest.fail("extracted before checking options"))
    with pytest.raises(SystemExit) as exit_info:
        accuracy.main([option, value])
    assert exit_info.value.code == 2 and f"argument {option}: expected an integer" in capsys.readouterr().err


def test_a_command_that_makes_only_some_rows_does_not_replace_a_table(accuracy, tmp_path, monkeypatch):
    """The published tables are merged from several commands: rerunning one of them into the table's
    --out would have dropped the others' rows."""
    out = tmp_path / "table"
    FakeRuns(accuracy, monkeypatch)
    accuracy.main([*CUT_COMMAND, "--out", str(out)])
    table = out.with_name("table.json").read_text()
    narrower = FakeRuns(accuracy, monkeypatch)
    with pytest.raises(SystemExit, match=r"--out: .*table.json holds 2 run\(s\) this command does not make again.*"
                                         r"--resume .*--force"):
        accuracy.main([*CUT_COMMAND[:-2], "ProtoOT default", "--out", str(out)])
    with pytest.raises(SystemExit, match="holds runs made with other settings .*epochs 60 there, 30 here"):
        accuracy.main([*CUT_COMMAND, "--out", str(out), "--epochs", "30"])
    assert narrower.finished == [] and out.with_name("table.json").read_text() == table
    accuracy.main([*CUT_COMMAND, "--out", str(out)])  # the same command: it makes every row again
    accuracy.main([*CUT_COMMAND[:-2], "ProtoOT default", "--out", str(out) + ".json", "--force"])
    assert {run["method"] for run in json.loads(out.with_name("table.json").read_text())["runs"]} == {"ProtoOT default"}
    assert not out.with_name("table.json.json").exists()


def test_merge_takes_every_method_by_default_needs_out_and_says_it_merged(accuracy, tmp_path, monkeypatch, capsys):
    FakeRuns(accuracy, monkeypatch)
    monkeypatch.setattr(accuracy, "DEFAULT_OUT", tmp_path / "published")  # where a merge without --out once wrote
    first, second = tmp_path / "first", tmp_path / "second"
    accuracy.main([*CUT_COMMAND[:-2], "ProtoOT default", "--out", str(first)])
    accuracy.main([*CUT_COMMAND[:-2], "ProtoOT default, tau 0.3", "--out", str(second)])
    sources = [str(first) + ".json", str(second) + ".json"]
    with pytest.raises(SystemExit):
        accuracy.main(["--merge", *sources])
    assert "--merge needs --out" in capsys.readouterr().err
    payload = accuracy.main(["--merge", *sources, "--out", str(first)])  # the first file takes the second's rows
    assert payload["config"]["methods"] == ["ProtoOT default", "ProtoOT default, tau 0.3"]
    assert len(payload["runs"]) == 8 and payload == json.loads(first.with_name("first.json").read_text())
    assert f"Merged from those commands by `{payload['merged_by'][0]}`;" in first.with_name("first.md").read_text()
    third = tmp_path / "third"
    accuracy.main([*CUT_COMMAND[:-2], "ProtoOT official", "--out", str(third)])
    again = accuracy.main(["--merge", str(first) + ".json", str(third) + ".json", "--out", str(first)])
    assert len(again["merged_by"]) == 2  # the first merge is still named after the second
    assert ", then `" in first.with_name("first.md").read_text()
    with pytest.raises(SystemExit, match="--merge: the files hold no run of --methods"):
        accuracy.main(["--merge", sources[1], "--methods", "ProtoOT official", "--out", str(tmp_path / "none")])


def test_a_table_merged_from_several_commands_is_not_rewritten_by_one_of_them(accuracy, tmp_path, monkeypatch):
    """A command that makes every row again (the table's first command, say) rewrote it run by run: a cut run
    left a fraction of the table."""
    seeds, command = CUT_COMMAND.index("--seeds"), [*CUT_COMMAND[:-2], "ProtoOT default"]  # raw features: seed 0 only
    with_seeds = lambda *chosen: [*command[:seeds + 1], *chosen, *command[seeds + 3:]]  # noqa: E731
    FakeRuns(accuracy, monkeypatch)
    table, other = tmp_path / "table", tmp_path / "other"
    accuracy.main([*with_seeds("0", "1"), "--out", str(table)])
    accuracy.main([*with_seeds("2"), "--out", str(other)])
    accuracy.main(["--merge", str(table) + ".json", str(other) + ".json", "--out", str(table)])
    merged = table.with_name("table.json").read_text()
    rerun = FakeRuns(accuracy, monkeypatch)
    every_row = with_seeds("0", "1", "2")
    with pytest.raises(SystemExit, match=r"--out: .*table.json was merged from 2 commands; run this one into another "
                                         r"--out and --merge it in, pass --resume to add to it, or --force"):
        accuracy.main([*every_row, "--out", str(table)])
    assert rerun.finished == [] and table.with_name("table.json").read_text() == merged
    accuracy.main([*every_row, "--out", str(table), "--resume"])  # nothing left to run: the table stays whole
    assert rerun.finished == [] and len(json.loads(merged)["runs"]) == 6
    accuracy.main([*with_seeds("0"), "--out", str(table), "--force"])
    assert {run["seed"] for run in json.loads(table.with_name("table.json").read_text())["runs"]} == {0}


@pytest.mark.parametrize("content", ["{not json", '{"runs": []}'])
def test_resume_and_merge_refuse_a_file_that_is_not_results(accuracy, tmp_path, monkeypatch, content):
    FakeRuns(accuracy, monkeypatch)
    path = tmp_path / "cut.json"
    path.write_text(content)
    with pytest.raises(SystemExit, match="--resume: .*cut.json"):
        accuracy.main([*CUT_COMMAND, "--out", str(tmp_path / "cut"), "--resume"])
    with pytest.raises(SystemExit, match="--merge: .*cut.json"):
        accuracy.main(["--merge", str(path), "--out", str(tmp_path / "merged")])


def test_missing_data_folder_names_the_option(accuracy, tmp_path):
    with pytest.raises(SystemExit, match="--data: .*nope is not a folder"):
        accuracy.extract_features(tmp_path / "nope", tmp_path, 2, 32, None, "cpu")


def test_recorded_commands_quote_method_names(accuracy, monkeypatch):
    import shlex

    monkeypatch.setattr(sys, "argv", ["benchmarks/accuracy.py", "--methods", "ProtoOTMiner + NTXentLoss"])
    assert shlex.split(accuracy.command_line())[1:] == sys.argv


def test_bench_ot_flags_converged_ratios_of_runs_far_apart_in_rounds(monkeypatch):
    bench_ot = load_script("bench_ot", monkeypatch)

    def rows(pot_rounds):
        return [{"N": 10, "K": 2, "mode": "converged", "method": name, "seconds": 1e-3,
                 "rounds": pot_rounds if name.startswith("pot") else 4} for name in bench_ot.METHODS]

    assert "†" not in bench_ot.speed_markdown(rows(pot_rounds=8))  # 2x the rounds: still the solvers compared
    flagged = bench_ot.speed_markdown(rows(pot_rounds=9))
    assert "| 1.00x † |" in flagged and "compares the stopping rules" in flagged


@pytest.mark.parametrize("name", ["bench_ot", "bench_ot_cuda", "bench_ot_xeon"])
def test_stored_bench_ot_tables_render_from_their_json(monkeypatch, name):
    bench_ot = load_script("bench_ot", monkeypatch)
    results = ACCURACY_SCRIPT.parent / "results"
    payload = json.loads((results / f"{name}.json").read_text())
    assert bench_ot.report_markdown(payload) == (results / f"{name}.md").read_text()


def test_a_benchmark_rerun_with_the_published_options_may_replace_its_table(monkeypatch, tmp_path):
    common = load_script("_common", monkeypatch)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 6])
    parser.add_argument("--mode", default="a b")
    parser.add_argument("--out", default="bench_x")
    parser.add_argument("--force", action="store_true")
    (tmp_path / "bench_x.json").write_text(json.dumps({"command": "python3 bench_x.py --mode 'a b' --sizes 5 6 --force"}))
    # the same values in any order or spelling, any interpreter or folder, with or without --force or --out
    for words in ([], ["--sizes", "5", "6"], ["--out", "bench_x", "--mode", "a b"]):
        common.check_same_options("bench_x", parser, parser.parse_args(words))
    common.check_same_options("bench_y", parser, parser.parse_args(["--sizes", "1"]))  # nothing published yet
    with pytest.raises(SystemExit, match="was made by `python3 bench_x.py --mode 'a b' --sizes 5 6 --force`"):
        common.check_same_options("bench_x", parser, parser.parse_args(["--sizes", "6"]))
    common.check_same_options("bench_x", parser, parser.parse_args(["--sizes", "6", "--force"]))
    (tmp_path / "bench_x.json").write_text(json.dumps({"command": "python3 bench_x.py --gone 1"}))  # older options
    with pytest.raises(SystemExit, match="with other options"):
        common.check_same_options("bench_x", parser, parser.parse_args([]))


def test_bench_eval_keeps_the_runs_that_finished_when_a_worker_fails(monkeypatch):
    bench_eval = load_script("bench_eval", monkeypatch)
    metrics = {"precision_at_1": 0.5, "r_precision": 0.5, "mean_average_precision_at_r": 0.5}

    def fake_worker(command, **kwargs):
        method, size = command[-2], int(command[-1])
        if size == 20:  # e.g. out of memory at the larger size
            return subprocess.CompletedProcess(command, 1, "", "Traceback ...\nMemoryError: cannot allocate\n")
        run = {"method": method, "size": size, "seconds": 1.0, "cpu_seconds": 1.0, "peak_rss_mb": 100.0,
               "r_metrics_capped": False, "metrics": metrics}
        return subprocess.CompletedProcess(command, 0, "log line\n" + json.dumps(run) + "\n", "")

    written = []
    monkeypatch.setattr(bench_eval.subprocess, "run", fake_worker)
    monkeypatch.setattr(bench_eval, "write_results", lambda *result: written.append(result) or ("a.json", "a.md"))
    monkeypatch.setattr(sys, "argv", ["bench_eval.py", "--sizes", "10", "20", "--methods", "pml", "protoot",
                                      "--out", "bench_eval_never_published"])
    with pytest.raises(SystemExit, match=r"2 run\(s\) failed \(bench_eval_never_published_partial holds the others\):"
                                         r"\npml N=20: exit code 1, MemoryError: cannot allocate"):
        bench_eval.main()
    (name, payload, markdown), = written  # beside the table, never in its place
    assert name == "bench_eval_never_published_partial"
    assert [(run["method"], run["size"]) for run in payload["runs"]] == [("pml", 10), ("protoot", 10)]
    assert "Failed: protoot N=20: exit code 1, MemoryError: cannot allocate" in markdown
    written.clear()
    monkeypatch.setattr(sys, "argv", ["bench_eval.py", "--sizes", "20", "--out", "bench_eval_never_published"])
    with pytest.raises(SystemExit, match=r"4 run\(s\) failed:"):
        bench_eval.main()
    assert written == []  # nothing finished: nothing written


def test_smoke_runs_are_not_guarded_and_an_uncreatable_out_is_an_argument_error(accuracy, tmp_path, monkeypatch,
                                                                                 capsys):
    FakeRuns(accuracy, monkeypatch)
    monkeypatch.setattr(accuracy, "SMOKE_DIR", tmp_path / "smoke")
    smoke = tmp_path / "smoke" / "quick"
    accuracy.main([*CUT_COMMAND, "--out", str(smoke)])
    accuracy.main([*CUT_COMMAND[:-2], "ProtoOT default", "--epochs", "2", "--out", str(smoke)])  # throwaway: replaced
    assert {run["method"] for run in json.loads(smoke.with_name("quick.json").read_text())["runs"]} == {"ProtoOT default"}
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit):
        accuracy.main([*CUT_COMMAND, "--out", str(tmp_path / "afile" / "table")])
    assert "error: --out " in capsys.readouterr().err


def test_a_device_this_machine_lacks_ends_in_one_argparse_line_naming_the_option(monkeypatch, capsys):
    common = load_script("_common", monkeypatch)
    assert common.available_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bad, says in (("cuda", "'cuda': this machine has no cuda device"),
                      ("bogus", "expected a torch device such as cpu or cuda:0, got 'bogus'")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            common.available_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert common.available_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(argparse.ArgumentTypeError, match="'cuda:1': this machine has 1 CUDA device"):
        common.available_device("cuda:1")
    # every benchmark with --device refuses it so, before any work (was a traceback after the setup)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("accuracy", "bench_augment", "bench_ot", "bench_step"):
        script = load_script(name, monkeypatch)
        monkeypatch.setattr(sys, "argv", [f"{name}.py", "--device", "cuda"])
        with pytest.raises(SystemExit) as exit_info:
            script.build_parser().parse_args() if hasattr(script, "build_parser") else script.main()
        assert exit_info.value.code == 2, name
        assert "argument --device: 'cuda': this machine has no cuda device" in capsys.readouterr().err, name


def test_results_name_the_cpu_model_they_were_measured_on(monkeypatch, tmp_path):
    common = load_script("_common", monkeypatch)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux: the model name line, as lscpu shows it
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        assert common.cpu_model() == (names[0] if names else common.platform.processor() or common.platform.machine())
    assert common.machine("cpu") == f"{common.platform.platform()}, {common.cpu_model()}, {os.cpu_count()} CPUs (cpu)"
    missing = tmp_path / "no_cpuinfo"
    monkeypatch.setattr(common, "Path", lambda path: missing if path == "/proc/cpuinfo" else Path(path))
    assert common.cpu_model() == (common.platform.processor() or common.platform.machine())
