"""Figures of the pacs-mini accuracy benchmark: a bar chart of the results JSON and a retrieval strip.

* ``accuracy_bars.png``: mean P@15 over seeds per domain direction (and the mean over
  directions), one bar per method, error bars = standard deviation over seeds; read from the
  JSON that ``benchmarks/accuracy.py`` wrote, nothing is re-run.
* ``retrieval_strip.png``: a few query photos and, per method, their top-5 sketches, framed
  green when the class matches and red when not. The heads are trained here (seed 0) through
  ``accuracy.fit_method``, the code path whose scores make the table, on the cached features.

    OMP_NUM_THREADS=1 python benchmarks/figures.py              # both figures into docs/img/
    OMP_NUM_THREADS=1 python benchmarks/figures.py --no-strip   # the bar chart only (seconds)
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
from _common import configure_logging, int_in, pin_threads  # noqa: E402

logger = logging.getLogger("benchmarks.figures")

DEFAULT_RESULTS = accuracy.BENCHMARKS / "results" / "accuracy_pacs_mini.json"
DEFAULT_OUT = accuracy.BENCHMARKS.parent / "docs" / "img"
FIGURE_WIDTH_IN, BAR_HEIGHT_IN, DPI = 12, 5, 150
STRIP_PAIR = ("photo", "sketch")  # queries from the first domain, results from the second
STRIP_METHODS = ("raw features", "ProtoOT official", "ProtoOT default")
STRIP_CLASSES = ("dog", "elephant", "guitar", "house")
TOP_K, THUMBNAIL_PX = 5, 160
HIT_COLOUR, MISS_COLOUR = "#1a9850", "#d73027"


# ------------------------------------------------------------------------------ bar chart


def pair_summary(results: dict, metric: str = "P@15") -> tuple[list[str], list[str], list[list], list[list]]:
    """Per method and direction, the mean and standard deviation over seeds of ``metric``.

    Only runs trained on one of ``config["pairs"]`` count (a joint run also scores the pairs'
    directions, as in ``accuracy.summarise``). The last column is the mean over directions,
    averaged per seed first. One seed (raw features) gives a standard deviation of 0.

    Returns:
        ``(directions, methods, means, stds)``: ``means[m][d]`` for method ``m`` and direction
        ``d`` (the last ``d`` is ``"mean"``), as fractions.
    """
    config = results["config"]
    directions = [direction for pair in config["pairs"] for direction in accuracy.direction_names(pair)]
    methods, means, stds = [], [], []
    for method in config["methods"]:
        per_seed = {}
        for run in results["runs"]:
            if run["method"] == method and run["train_domains"] in config["pairs"]:
                per_seed.setdefault(run["seed"], {}).update({d: v[metric] for d, v in run["directions"].items()})
        complete = [values for values in per_seed.values() if all(d in values for d in directions)]
        if not complete:
            continue
        columns = [[values[d] for values in complete] for d in directions]
        columns.append([statistics.mean(values[d] for d in directions) for values in complete])
        methods.append(method)
        means.append([statistics.mean(column) for column in columns])
        stds.append([statistics.stdev(column) if len(column) > 1 else float("nan") for column in columns])
    return directions + ["mean"], methods, means, stds


def accuracy_bars(results: dict, metric: str = "P@15") -> plt.Figure:
    """Grouped bars: one group per direction (and the mean), one bar per method, in percent."""
    directions, methods, means, stds = pair_summary(results, metric)
    figure, axes = plt.subplots(figsize=(FIGURE_WIDTH_IN, BAR_HEIGHT_IN), layout="constrained")
    width = 0.8 / len(methods)
    colours = plt.get_cmap("tab10").colors
    for position, (method, mean, std) in enumerate(zip(methods, means, stds)):
        offsets = [group + (position - (len(methods) - 1) / 2) * width for group in range(len(directions))]
        axes.bar(
            offsets, [100 * m for m in mean], width, yerr=[100 * s for s in std], capsize=2,
            label=method, color=colours[position % len(colours)], error_kw={"elinewidth": 0.8},
        )
    axes.axvline(len(directions) - 1.5, color="grey", linewidth=0.8, linestyle=":")  # the mean is not a direction
    axes.set_xticks(range(len(directions)), [label.replace("->", "\n→ ").replace("_", " ") for label in directions])
    axes.set_ylabel(f"{metric} (%)")
    axes.set_ylim(0, 100)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    config = results["config"]
    axes.set_title(
        f"Cross-domain retrieval on pacs-mini, query → gallery: {metric}, mean ± std over seeds {config['seeds']}\n"
        f"heads trained {config['epochs']} epochs on each domain pair; raw features: untrained, one run", fontsize=10,
    )
    axes.legend(ncols=len(methods), loc="upper center", fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1.0))
    return figure


# ------------------------------------------------------------------------------ retrieval strip


def top_k_gallery(fitted: accuracy.FittedMethod, query_rows: torch.Tensor, k: int) -> torch.Tensor:
    """``(Q, k)`` gallery positions (second domain) ranked by cosine similarity, as the tester ranks."""
    with torch.no_grad():
        embeddings = torch.nn.functional.normalize(fitted.model(fitted.eval_features), dim=1)
    gallery = torch.nonzero(fitted.domain_ids == 1).flatten()
    similarity = embeddings[query_rows] @ embeddings[gallery].T
    return gallery[similarity.topk(k, dim=1).indices]


def first_query_of_each(fitted: accuracy.FittedMethod, class_ids: list[int]) -> torch.Tensor:
    """The first image of the query domain (position 0) of every class in ``class_ids``."""
    queries = torch.nonzero(fitted.domain_ids == 0).flatten()
    return torch.stack([queries[fitted.labels[queries] == class_id][0] for class_id in class_ids])


def thumbnail(path: str) -> Image.Image:
    image = Image.open(path).convert("RGB")
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return image


def show_image(axes, path: str, frame_colour: str | None = None, title: str = "") -> None:
    axes.imshow(thumbnail(path))
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title, fontsize=8, pad=2)
    for spine in axes.spines.values():
        spine.set_visible(frame_colour is not None)
        if frame_colour:
            spine.set_edgecolor(frame_colour)
            spine.set_linewidth(4)


def retrieval_strip(rankings: dict, query_rows: torch.Tensor, labels, paths, classes, title: str) -> plt.Figure:
    """One block of rows per query: the query photo, then per method its top-k results, framed by hit/miss.

    Args:
        rankings: ``{method: (Q, k) row indices}`` of the retrieved images, best first.
        query_rows: ``(Q,)`` row indices of the queries.
        labels: ``(N,)`` class of every row; ``paths``: image file of every row; ``classes``: class names.
    """
    methods, k = list(rankings), next(iter(rankings.values())).shape[1]
    rows = len(query_rows) * len(methods)
    figure = plt.figure(figsize=(FIGURE_WIDTH_IN, 1.55 * rows + 0.6), layout="constrained")
    grid = figure.add_gridspec(rows, k + 2, width_ratios=[1.3, 1.1] + [1] * k)
    for block, query in enumerate(query_rows.tolist()):
        first = block * len(methods)
        show_image(figure.add_subplot(grid[first:first + len(methods), 0]), paths[query],
                   title=f"query: {classes[labels[query]]}")
        for offset, method in enumerate(methods):
            retrieved = rankings[method][block].tolist()
            hits = sum(labels[row] == labels[query] for row in retrieved)
            name = figure.add_subplot(grid[first + offset, 1])
            name.axis("off")
            name.text(1.0, 0.5, f"{method}\n{hits}/{k} hits", ha="right", va="center", fontsize=9)
            for rank, row in enumerate(retrieved):
                hit = labels[row] == labels[query]
                show_image(figure.add_subplot(grid[first + offset, rank + 2]), paths[row],
                           HIT_COLOUR if hit else MISS_COLOUR, f"{rank + 1}. {classes[labels[row]]}")
    figure.suptitle(title, fontsize=10)
    return figure


def strip_figure(epochs: int, seed: int = 0, device: str = "cpu", data=accuracy.DATA,
                 cache_dir=accuracy.CACHE_DIR) -> plt.Figure:
    """Train ``STRIP_METHODS`` on ``STRIP_PAIR`` once (cached features) and draw their retrievals."""
    features, _ = accuracy.extract_features(data, cache_dir, 4, 224, None, device)
    dataset = accuracy.MultiDomainImageFolder(data, accuracy.JOINT)  # the order the cache holds
    class_ids = [dataset.classes.index(name) for name in STRIP_CLASSES]
    rankings, query_rows = {}, None
    for method in STRIP_METHODS:
        logger.info("fitting %s on %s (%d epochs, seed %d)", method, "+".join(STRIP_PAIR), epochs, seed)
        fitted = accuracy.fit_method(features, STRIP_PAIR, method, seed, epochs, torch.device(device))
        queries = first_query_of_each(fitted, class_ids)  # the same images for every method: rows keep their order
        query_rows = fitted.rows[queries]
        rankings[method] = fitted.rows[top_k_gallery(fitted, queries, TOP_K)]
    paths = [path for path, _, _ in dataset.samples]
    title = (f"Top-{TOP_K} {STRIP_PAIR[1]}s for {STRIP_PAIR[0]} queries (pacs-mini, heads trained {epochs} epochs "
             f"on {STRIP_PAIR[0]}+{STRIP_PAIR[1]}, seed {seed}); green = same class, red = other class")
    return retrieval_strip(rankings, query_rows, features.labels.tolist(), paths, dataset.classes, title)


# ------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="accuracy.py's results JSON")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for the PNGs (default: docs/img, the images the README shows: they are replaced)")
    parser.add_argument("--epochs", type=int_in(1), default=30, help="training epochs of the strip's heads")
    parser.add_argument("--data", default=str(accuracy.DATA), help="the pacs-mini folder of the strip")
    parser.add_argument("--cache-dir", default=str(accuracy.CACHE_DIR), help="the strip's feature cache folder")
    parser.add_argument("--metric", default="P@15", choices=list(accuracy.METRICS))
    parser.add_argument("--no-strip", action="store_true", help="only the bar chart (no training)")
    return parser


def save(figure: plt.Figure, path: Path, dpi: int = DPI) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    print(f"wrote {path}")
    return path


def main(argv=None) -> list[Path]:
    args = build_parser().parse_args(argv)
    configure_logging()
    results = accuracy.read_results(args.results, "--results")
    if not pair_summary(results, args.metric)[1]:
        raise SystemExit(f"--results: {args.results} holds no method with every pair direction of a seed")
    written = [save(accuracy_bars(results, args.metric), args.out / "accuracy_bars.png")]
    if not args.no_strip:
        pin_threads(1)
        strip = strip_figure(args.epochs, data=args.data, cache_dir=args.cache_dir)
        written.append(save(strip, args.out / "retrieval_strip.png", dpi=100))
    return written


if __name__ == "__main__":
    main()
