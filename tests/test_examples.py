"""The scripts in examples/ run (a few iterations) and do what their docstrings say."""
import difflib
import importlib.util
import inspect
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_protoot.data import make_synthetic_domains

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_pairs(results, domains):
    expected = {f"{a}->{b}" for a in domains for b in domains if a != b} | {"mean"}
    assert set(results) == expected
    assert all(0 <= metrics["precision_at_5"] <= 1 for metrics in results.values())


def test_swap_into_pml_runs_both_scripts(device):
    swap = load_example("swap_into_pml")
    torch.manual_seed(0)
    baseline, baseline_results = swap.pml_baseline(2, device)
    assert baseline.iteration == 1 and math.isfinite(float(baseline.losses["total_loss"]))
    torch.manual_seed(0)
    trainer, results = swap.protoot_swap(2, device)
    assert trainer.iteration == 1 and math.isfinite(float(trainer.losses["total_loss"]))
    assert bool(trainer.memory.written.all()) and int(trainer.memory.epoch) == 0
    assert_pairs(baseline_results, ["filled", "outline"])
    assert_pairs(results, ["filled", "outline"])


def test_swap_into_pml_marks_every_changed_line():
    swap = load_example("swap_into_pml")
    baseline = inspect.getsource(swap.pml_baseline).splitlines()[2:]  # past the def and docstring lines
    protoot = inspect.getsource(swap.protoot_swap).splitlines()[2:]
    added = [line[1:] for line in difflib.ndiff(baseline, protoot) if line.startswith("+ ")]
    unmarked = [line for line in added if line.strip() and "# ProtoOT" not in line]
    assert added and not unmarked, unmarked


def test_swap_into_pml_main_parses_iterations(monkeypatch):
    swap = load_example("swap_into_pml")
    calls = []
    monkeypatch.setattr(swap, "pml_baseline", lambda iterations, device: calls.append(("pml", iterations, device)))
    monkeypatch.setattr(swap, "protoot_swap", lambda iterations, device: calls.append(("protoot", iterations, device)))
    swap.main(["--iterations", "5", "--device", "cpu"])
    assert calls == [("pml", 5, torch.device("cpu")), ("protoot", 5, torch.device("cpu"))]
    calls.clear()
    swap.main(["--device", "cpu"])  # default: one pass of each sampler (PML's len(dataloader))
    assert calls == [("pml", None, torch.device("cpu")), ("protoot", None, torch.device("cpu"))]


@pytest.mark.parametrize("example_name, argv, says", [
    ("swap_into_pml", ["--iterations", "0"], "--iterations must be at least 1, got 0"),
    ("train_timm_backbone", ["--iterations", "-3"], "--iterations must be at least 1, got -3"),
    ("train_timm_backbone", ["--epochs", "0"], "--epochs must be at least 1, got 0"),
    ("evaluate_your_model", ["--domains", "photo", "sketch"], "--domains picks folders of --data"),
])
def test_examples_refuse_options_they_would_otherwise_ignore_or_misread(example_name, argv, says, capsys):
    # 0 iterations meant a full pass, -3 none, 0 epochs printed untrained scores, --domains alone was ignored
    with pytest.raises(SystemExit) as exit_info:
        load_example(example_name).main(argv)
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


def test_evaluate_your_model_matches_pml_accuracy_calculator(device, exact_float32):
    example = load_example("evaluate_your_model")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=0).to(device).eval()
    config = timm.data.resolve_data_config(model=model)
    dataset_dict = example.load_eval_images(None, None, 32, config["mean"], config["std"])
    results = example.evaluate(model, dataset_dict, k_values=(1, 5))
    assert_pairs(results, ["filled", "outline"])

    # PML's own calculator on the same embeddings: P@1 is ProtoOT's P@1; mAP@R is shared.
    embeddings, labels = {}, {}
    with torch.no_grad():
        for domain, dataset in dataset_dict.items():
            images = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(device)
            embeddings[domain] = F.normalize(model(images).float(), dim=1).cpu()
            labels[domain] = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    reference = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), device=torch.device("cpu"))
    for query, gallery in [("filled", "outline"), ("outline", "filled")]:
        expected = reference.get_accuracy(embeddings[query], labels[query], embeddings[gallery], labels[gallery], False)
        for metric, value in expected.items():
            assert results[f"{query}->{gallery}"][metric] == pytest.approx(value, abs=1e-6), metric


def test_train_timm_backbone_on_an_image_folder(tmp_path, device):
    example = load_example("train_timm_backbone")
    make_synthetic_domains(tmp_path, num_classes=2, images_per_class=4, image_size=16, domains=("outline", "dots"))
    argv = ["--data", str(tmp_path), "--backbone", "resnet10t", "--image-size", "16", "--epochs", "1",
            "--iterations", "2", "--batch-size", "4", "--device", str(device)]
    trainer, before, after = example.main(argv)
    assert trainer.iteration == 1 and int(trainer.memory.epoch) == 0
    assert trainer.memory.num_samples == 16
    assert_pairs(before, ["outline", "dots"])
    assert_pairs(after, ["outline", "dots"])


class SizeChosen(Exception):
    pass


def stop_at_loading(size):
    raise SizeChosen(size)


@pytest.mark.parametrize("example_name, loader", [("train_timm_backbone", "load_images"),
                                                  ("evaluate_your_model", "load_eval_images")])
@pytest.mark.parametrize(
    "backbone, given, expected",
    [("resnet10t", None, 64), ("resnet10t", 40, 40), ("vit_tiny_patch16_224", None, 224),
     ("vit_tiny_patch16_224", 224, 224), ("xcit_nano_12_p16_224", 64, 64), ("resnet10t", 0, 0)],
)
def test_examples_give_a_fixed_size_backbone_its_size_unless_told(example_name, loader, backbone, given, expected,
                                                                 monkeypatch):
    """An unset --image-size is 64, or the size timm builds a ViT for (evaluate_your_model had a plain
    64, on which a ViT failed deep in its first batch); a given one is used as given."""
    example = load_example(example_name)
    monkeypatch.setattr(example, loader, lambda data, domains, size, *args, **kwargs: stop_at_loading(size))
    argv = ["--backbone", backbone, "--device", "cpu"] + (["--image-size", str(given)] if given is not None else [])
    with pytest.raises(SizeChosen) as chosen:
        example.main(argv)
    assert chosen.value.args == (expected,)
