"""Retrieval evaluation speed and memory: PrecisionAtKCalculator vs PML's AccuracyCalculator vs torch brute force.

Each (method, size) runs in a fresh subprocess so that peak RSS is its own. Data: N queries
and N gallery items, 128-d, 65 Gaussian classes, L2-normalised.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py --sizes 5000 20000 50000
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_same_options, command_line, int_in, markdown_table, peak_rss_mb, pin_threads, write_results  # noqa: E402

METHODS = ("protoot", "protoot_float32", "pml", "torch_brute_force")
K_VALUES = (1, 5, 15, 50, 100, 200)
PML_K = 200
R_METRICS = ("r_precision", "mean_average_precision_at_r")
logger = logging.getLogger("bench_eval")


def make_data(size: int, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(65, 128, generator=generator)

    def domain():
        labels = torch.randint(0, 65, (size,), generator=generator)
        x = centres[labels] + 1.5 * torch.randn(size, 128, generator=generator)
        return torch.nn.functional.normalize(x, dim=1), labels

    return (*domain(), *domain())


def run_protoot(query, query_labels, gallery, gallery_labels, prefilter="auto"):
    import torch
    from pml_protoot.accuracy import PrecisionAtKCalculator

    include = ("precision_at_1",) + R_METRICS + tuple(f"precision_at_{k}" for k in K_VALUES[1:])
    calc = PrecisionAtKCalculator(k_values=K_VALUES, include=include, device=torch.device("cpu"), prefilter=prefilter)
    return calc.get_accuracy(query, query_labels, gallery, gallery_labels)


def run_protoot_float32(query, query_labels, gallery, gallery_labels):
    """The calculator without its bfloat16 screen: the float32 path on every machine."""
    return run_protoot(query, query_labels, gallery, gallery_labels, prefilter=None)


def run_pml(query, query_labels, gallery, gallery_labels):
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("precision_at_1",) + R_METRICS, k=PML_K, device=torch.device("cpu"))
    return calc.get_accuracy(query, query_labels, gallery, gallery_labels)


def run_torch_brute_force(query, query_labels, gallery, gallery_labels, chunk=1024):
    """Plain chunked top-(max R) search with torch.topk and the textbook formulas."""
    import torch

    counts = torch.bincount(gallery_labels, minlength=int(gallery_labels.max()) + 1)
    depth = max(int(counts.max()), max(K_VALUES))
    hits = torch.zeros(len(K_VALUES), dtype=torch.float64)
    denominators = torch.zeros(len(K_VALUES), dtype=torch.float64)
    p1, r_prec, map_r = [], [], []
    for start in range(0, len(query), chunk):
        labels = query_labels[start : start + chunk]
        ranked = torch.topk(query[start : start + chunk] @ gallery.T, depth, dim=1).indices
        relevant = gallery_labels[ranked] == labels[:, None]
        R = counts[labels]
        cumulative = relevant.cumsum(1)
        positions = torch.arange(1, depth + 1)
        for j, k in enumerate(K_VALUES):
            cut = torch.clamp(R, max=k)
            hits[j] += cumulative.gather(1, (cut - 1)[:, None]).sum()
            denominators[j] += cut.sum()
        p1.append(relevant[:, 0].double())
        r_prec.append(cumulative.gather(1, (R - 1)[:, None]).flatten() / R)
        within = positions[None] <= R[:, None]
        map_r.append((relevant * cumulative / positions * within).sum(1) / R)
    result = {f"precision_at_{k}": float(hits[j] / denominators[j]) for j, k in enumerate(K_VALUES)}
    result.update(
        precision_at_1=float(torch.cat(p1).mean()),
        r_precision=float(torch.cat(r_prec).mean()),
        mean_average_precision_at_r=float(torch.cat(map_r).mean()),
    )
    return result


def worker(method: str, size: int) -> dict:
    threads = pin_threads(1)
    import torch

    data = make_data(size)
    max_r = int(torch.bincount(data[3]).max())
    runner = {
        "protoot": run_protoot, "protoot_float32": run_protoot_float32, "pml": run_pml,
        "torch_brute_force": run_torch_brute_force,
    }[method]
    # Both libraries are imported before the clock starts: the comparison is of the computation.
    import pml_protoot.accuracy  # noqa: F401
    import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401

    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = runner(*data)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "method": method,
        "size": size,
        "seconds": seconds,
        # One thread: CPU time is the work done, less sensitive than wall time to other load.
        "cpu_seconds": cpu_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "max_R": max_r,
        "r_metrics_capped": method == "pml" and PML_K < max_r,
        "metrics": {k: float(v) for k, v in metrics.items()},
        **threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int_in(1), nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", default="bench_eval", help="results name under benchmarks/results")
    parser.add_argument("--force", action="store_true", help="replace the published results even when another command made them")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return
    check_same_options(args.out, parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs, failures, load_before, started = [], [], os.getloadavg(), time.perf_counter()
    for size in args.sizes:
        for method in args.methods:
            worker_run = subprocess.run(
                [sys.executable, __file__, "--worker", method, str(size)], capture_output=True, text=True
            )
            if worker_run.returncode != 0:  # e.g. out of memory at the largest size: keep the other runs
                last_line = (worker_run.stderr.strip().splitlines() or ["no output"])[-1]
                failures.append(f"{method} N={size}: exit code {worker_run.returncode}, {last_line}")
                logger.error("%s", failures[-1])
                continue
            runs.append(json.loads(worker_run.stdout.strip().splitlines()[-1]))
            logger.info("%s N=%d: %.2f s, %.0f MB", method, size, runs[-1]["seconds"], runs[-1]["peak_rss_mb"])
    if failures:  # never in place of a complete table: beside it, and only what finished
        if runs:
            write_report(runs, failures, load_before, os.getloadavg(), time.perf_counter() - started,
                         f"{args.out}_partial")
        raise SystemExit(f"{len(failures)} run(s) failed" + (f" ({args.out}_partial holds the others)" if runs else "")
                         + ":\n" + "\n".join(failures))
    write_report(runs, failures, load_before, os.getloadavg(), time.perf_counter() - started, args.out)


def write_report(runs: list[dict], failures: list[str], load_before, load_after, wall_seconds, name: str) -> None:
    baseline = {run["size"]: run for run in runs if run["method"] == "pml"}
    rows = []
    for run in runs:
        base = baseline.get(run["size"])
        ratio = f"{run['seconds'] / base['seconds']:.2f}" if base else "-"
        cpu_ratio = f"{run['cpu_seconds'] / base['cpu_seconds']:.2f}" if base else "-"
        memory_ratio = f"{run['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if base else "-"
        m = run["metrics"]
        rows.append([
            run["method"], run["size"], f"{run['seconds']:.2f}", f"{run['cpu_seconds']:.2f}", f"{run['peak_rss_mb']:.0f}",
            ratio, cpu_ratio, memory_ratio,
            "yes" if run["r_metrics_capped"] else "no", f"{m['precision_at_1']:.4f}", f"{m['r_precision']:.4f}",
            f"{m['mean_average_precision_at_r']:.4f}", f"{m.get('precision_at_200', float('nan')):.4f}",
        ])
        logger.info("%s N=%d: time x%s vs PML, memory x%s", run["method"], run["size"], ratio, memory_ratio)
    header = ["method", "N", "seconds", "CPU s", "peak MB", "time / PML", "CPU / PML", "memory / PML", "R-metrics capped",
              "P@1", "r_precision", "MAP@R", "ProtoOT P@200"]
    markdown = (
        f"# bench_eval\n\nCommand: `OMP_NUM_THREADS=1 {command_line()}`\n\n"
        f"N queries x N gallery, 128-d, 65 classes; torch and faiss pinned to 1 thread; each run in a fresh "
        f"subprocess (peak RSS includes the data), libraries imported before timing; seconds are wall "
        f"time, CPU s the process's CPU time (the machine is shared, so wall time carries others' load). "
        f"PML: `AccuracyCalculator(k={PML_K})`. protoot: the default (`prefilter=\"auto\"`: bfloat16 screen where "
        f"the CPU has native bfloat16); protoot_float32: `prefilter=None`.\n\n"
        f"Load average (1, 5, 15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.2f}' for x in load_after)}; wall time {wall_seconds / 60:.1f} min.\n\n"
        + markdown_table(header, rows)
        + "".join(f"\nFailed: {failure}\n" for failure in failures)
    )
    payload = {
        "command": command_line(), "pml_k": PML_K, "k_values": K_VALUES, "runs": runs, "failures": failures,
        "load_average_before": load_before, "load_average_after": load_after, "wall_seconds": wall_seconds,
    }
    paths = write_results(name, payload, markdown)
    logger.info("wrote %s and %s", *paths)


if __name__ == "__main__":
    main()
