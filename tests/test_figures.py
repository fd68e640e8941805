"""benchmarks/figures.py on synthetic inputs: the bar chart's numbers, the strip's ranking and frames."""
import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.colors import to_hex
from PIL import Image

FIGURES_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "figures.py"


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("benchmark_figures", FIGURES_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def synthetic_results(rng: random.Random) -> dict:
    """Two pairs; a trained method over 3 seeds, raw features once, and a joint run that must not count."""
    pairs = [["photo", "sketch"], ["art", "sketch"]]
    runs = []
    for method, seeds in (("raw features", [0]), ("trained", [0, 1, 2])):
        for seed in seeds:
            for train_domains in pairs + [["art", "photo", "sketch"]]:
                directions = {
                    f"{q}->{g}": {"P@15": rng.random(), "mAP": rng.random()}
                    for q in train_domains for g in train_domains if q != g
                }
                runs.append({"method": method, "train_domains": train_domains, "seed": seed, "directions": directions})
    config = {"pairs": pairs, "methods": ["raw features", "trained"], "seeds": [0, 1, 2], "epochs": 3}
    return {"config": config, "runs": runs}


def plain_summary(results, method, metric):
    """Means and stds over seeds per direction of the pair runs, then of the per-seed direction means."""
    pair_runs = [r for r in results["runs"] if r["method"] == method and len(r["train_domains"]) == 2]
    per_seed = {}
    for run in pair_runs:
        for direction, values in run["directions"].items():
            per_seed.setdefault(run["seed"], {})[direction] = values[metric]
    directions = ["photo->sketch", "sketch->photo", "art->sketch", "sketch->art"]
    columns = [[per_seed[s][d] for s in per_seed] for d in directions]
    columns.append([sum(per_seed[s][d] for d in directions) / len(directions) for s in per_seed])
    means = [sum(column) / len(column) for column in columns]
    stds = [
        math.sqrt(sum((v - m) ** 2 for v in column) / (len(column) - 1)) if len(column) > 1 else math.nan
        for column, m in zip(columns, means)
    ]
    return directions + ["mean"], means, stds


@pytest.mark.parametrize("metric", ["P@15", "mAP"])
def test_pair_summary_matches_a_plain_computation(figures, metric):
    results = synthetic_results(random.Random(0))
    directions, methods, means, stds = figures.pair_summary(results, metric)
    assert methods == ["raw features", "trained"]
    for method, method_means, method_stds in zip(methods, means, stds):
        expected_directions, expected_means, expected_stds = plain_summary(results, method, metric)
        assert directions == expected_directions
        assert method_means == pytest.approx(expected_means, rel=1e-12)
        assert method_stds == pytest.approx(expected_stds, rel=1e-12, nan_ok=True)


def test_accuracy_bars_draw_the_summary_and_write_a_png(figures, tmp_path):
    results = synthetic_results(random.Random(1))
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    figure = figures.accuracy_bars(json.loads(path.read_text()))
    _, methods, means, _ = figures.pair_summary(results)
    bars = figure.axes[0].containers
    drawn = [[bar.get_height() for bar in container] for container in bars if hasattr(container, "patches")]
    assert drawn == [pytest.approx([100 * m for m in method_means]) for method_means in means]
    assert [container.get_label() for container in bars if hasattr(container, "patches")] == methods

    written = figures.save(figure, tmp_path / "img" / "bars.png", dpi=40)
    with Image.open(written) as image:
        assert image.format == "PNG"
        assert image.size == (figures.FIGURE_WIDTH_IN * 40, figures.BAR_HEIGHT_IN * 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_gallery_matches_a_brute_force_cosine_ranking(figures, dtype, device):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(30, 6, generator=generator, dtype=dtype)
    domain_ids = torch.tensor([0] * 12 + [1] * 18)
    fitted = figures.accuracy.FittedMethod(
        torch.nn.Identity(), None, torch.arange(30), features.to(device), torch.zeros(30, dtype=torch.long),
        domain_ids.to(device), training_s={},
    )
    queries = torch.tensor([0, 5, 11], device=device)
    ranked = figures.top_k_gallery(fitted, queries, k=5).cpu()

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    rows = features.tolist()
    for query, retrieved in zip(queries.tolist(), ranked.tolist()):
        by_similarity = sorted(range(12, 30), key=lambda g: cosine(rows[query], rows[g]), reverse=True)
        assert retrieved == by_similarity[:5]


def test_retrieval_strip_frames_hits_green_and_misses_red(figures, tmp_path):
    paths = []
    for row, colour in enumerate(["red", "blue", "green", "white", "black", "grey"]):
        paths.append(str(tmp_path / f"{row}.png"))
        Image.new("RGB", (20, 30), colour).save(paths[-1])
    labels, classes = [0, 1, 0, 0, 1, 0], ["cat", "dog"]
    rankings = {"method a": torch.tensor([[2, 1, 3], [3, 0, 2]]), "method b": torch.tensor([[4, 5, 3], [1, 5, 2]])}
    query_rows = torch.tensor([0, 4])
    figure = figures.retrieval_strip(rankings, query_rows, labels, paths, classes, "title")

    framed = [axes for axes in figure.axes if axes.images and axes.spines["left"].get_visible()]
    expected = [
        figures.HIT_COLOUR if labels[row] == labels[query] else figures.MISS_COLOUR
        for query, block in zip(query_rows.tolist(), zip(*rankings.values())) for ranking in block
        for row in ranking.tolist()
    ]
    assert [to_hex(axes.spines["left"].get_edgecolor()) for axes in framed] == expected
    hits = [
        f"{method}\n{sum(labels[row] == labels[query] for row in rankings[method][block].tolist())}/3 hits"
        for block, query in enumerate(query_rows.tolist()) for method in rankings
    ]
    assert [text.get_text() for axes in figure.axes for text in axes.texts] == hits
    shown = [axes.images[0].get_array().shape for axes in figure.axes if axes.images]
    assert shown == [(30, 20, 3)] * (len(query_rows) + len(query_rows) * len(rankings) * 3)


@pytest.mark.parametrize("content, message", [
    (None, "--results: cannot read .*missing.json"),
    ({"config": {"pairs": [["photo", "sketch"]], "methods": ["m"], "seeds": [0], "epochs": 1}, "runs": []},
     "--results: .* holds no method with every pair direction"),
])
def test_main_refuses_results_it_cannot_draw_naming_the_option(figures, tmp_path, content, message):
    path = tmp_path / "missing.json"
    if content is not None:
        path.write_text(json.dumps(content))
    with pytest.raises(SystemExit, match=message):
        figures.main(["--results", str(path), "--out", str(tmp_path), "--no-strip"])
    assert not (tmp_path / "accuracy_bars.png").exists()
