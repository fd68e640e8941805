"""Speed and stability of ``pml_protoot.ot.sinkhorn`` against the official formula and POT.

Run from the repository root (CPU, one thread, float32)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ot.py [--quick] [--device cuda]

Methods, side by side on the same scores: ``sinkhorn`` (this package), ``official``
(PROTOOT.md, plain ``exp`` and repeated division, as the official code does), POT's
``ot.sinkhorn`` and ``ot.bregman.sinkhorn_log`` on torch tensors (plan x N). Writes
``benchmarks/results/bench_ot.{json,md}``. POT comes with the test and bench extras
(``pip install -e ".[bench]"``), not with the package.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import logging
import os
import time

import ot as pot
import torch
import torch.nn.functional as F
from tqdm import tqdm

from _common import (
    MIN_REPEAT_SECONDS,
    available_device,
    check_same_options,
    command_line,
    int_in,
    interleaved_median_seconds,
    machine,
    markdown_table,
    pin_threads,
    write_results,
)
from pml_protoot.ot import sinkhorn

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 128
SIZES = [1_000, 10_000, 100_000, 1_000_000]
PROTOTYPES = [7, 65, 345]
POT_MAX_ENTRIES = 10_000_000  # POT beyond N*K = 1e7 would take minutes per call on one core
CONVERGENCE_MAX_ENTRIES = 4_000_000  # up to N=10k x K=345: POT needs hundreds of rounds
TOL = 1e-4
MAX_ROUNDS = 2_000


def official_sinkhorn(scores, beta, epsilon, iterations, tol=None):
    """PROTOOT.md, in place as the official code; with ``tol``, stop once columns are within it."""
    Q = torch.exp(scores / epsilon).t()
    Q /= torch.sum(Q)
    K, N = Q.shape
    rounds = 0
    for rounds in range(1, iterations + 1):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q *= beta.unsqueeze(1)
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= N
        if tol is not None and (Q.sum(dim=1) - beta).abs().max() < tol:
            break
    Q *= N
    return Q.t(), rounds


def pot_solver(solver):
    def run(scores, beta, epsilon, iterations, tol=None):
        num_samples = scores.shape[0]
        sample_marginal = torch.full((num_samples,), 1 / num_samples, dtype=scores.dtype, device=scores.device)
        plan, log = solver(
            sample_marginal, beta, -scores, epsilon, numItermax=iterations, stopThr=tol or 0.0, log=True, warn=False
        )
        return plan * num_samples, int(log["niter"])

    return run


def package_sinkhorn(scores, beta, epsilon, iterations, tol=None):
    return sinkhorn(scores, beta, epsilon, iterations, tol=tol), None


METHODS = {
    "sinkhorn": package_sinkhorn,
    "official": official_sinkhorn,
    "pot_sinkhorn": pot_solver(pot.sinkhorn),
    "pot_sinkhorn_log": pot_solver(pot.bregman.sinkhorn_log),
}


def realistic_problem(num_samples, num_prototypes, device, seed=0):
    """Scores of an L2-normalised 128-d bank around K prototypes, imbalanced clusters; beta = sizes."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(num_prototypes, EMBEDDING_DIM, generator=generator), dim=1)
    weights = torch.rand(num_prototypes, generator=generator) ** 2 + 0.05
    labels = torch.multinomial(weights / weights.sum(), num_samples, replacement=True, generator=generator)
    beta = torch.bincount(labels, minlength=num_prototypes).float() + 1
    scores = torch.empty(num_samples, num_prototypes)
    for start in range(0, num_samples, 100_000):  # chunks keep the 128-d bank out of memory
        chunk = labels[start : start + 100_000]
        noise = torch.randn(len(chunk), EMBEDDING_DIM, generator=generator) / EMBEDDING_DIM**0.5
        bank = F.normalize(prototypes[chunk] + noise, dim=1)
        scores[start : start + len(chunk)] = bank @ prototypes.t()
    return scores.to(device), (beta / beta.sum()).to(device)


def column_error(plan, beta):
    return (plan.sum(0) / plan.shape[0] - beta).abs().max().item()


def methods_for(num_entries):
    return [name for name in METHODS if not name.startswith("pot") or num_entries <= POT_MAX_ENTRIES]


def speed_rows(sizes, prototypes, repeats, device):
    """Median time of every method at 3 rounds and to convergence (column error < TOL)."""
    rows = []
    for num_samples, num_prototypes in tqdm(list(itertools.product(sizes, prototypes)), desc="speed"):
        scores, beta = realistic_problem(num_samples, num_prototypes, device)
        entries = num_samples * num_prototypes
        for mode in ("3 rounds", "converged"):
            if mode == "converged" and entries > CONVERGENCE_MAX_ENTRIES:
                continue
            rows.extend(time_methods(methods_for(entries), mode, scores, beta, repeats, device))
        del scores
    return rows


def time_methods(names, mode, scores, beta, repeats, device):
    """One row per method: interleaved median time, rounds run, column error and finiteness."""
    iterations, tol = (3, None) if mode == "3 rounds" else (MAX_ROUNDS, TOL)
    rows = {}
    for name in names:
        plan, rounds = METHODS[name](scores, beta, 0.05, iterations, tol)
        if name == "sinkhorn" and tol is not None:
            _, rounds = official_sinkhorn(scores.double(), beta.double(), 0.05, iterations, tol)  # same rounds
        rows[name] = {
            "N": scores.shape[0], "K": scores.shape[1], "mode": mode, "method": name,
            "rounds": rounds if tol is not None else 3, "column_error": column_error(plan, beta),
            "finite": bool(torch.isfinite(plan).all()),
        }
    functions = {name: functools.partial(METHODS[name], scores, beta, 0.05, iterations, tol) for name in names}
    for name, seconds in interleaved_median_seconds(functions, repeats, device).items():
        rows[name]["seconds"] = seconds
    return list(rows.values())


def rounds_to_converge(sizes, prototypes, device):
    """Rounds the official iteration (= this package's) needs to reach 1e-3 and 1e-4 column error."""
    results = []
    for num_samples in sizes:
        for num_prototypes in prototypes:
            scores, beta = realistic_problem(num_samples, num_prototypes, device, seed=1)
            entry = {"N": num_samples, "K": num_prototypes, "epsilon": 0.05, "error_after_3": None}
            for tol in (1e-3, 1e-4):
                plan, rounds = official_sinkhorn(scores.double(), beta.double(), 0.05, MAX_ROUNDS, tol)
                entry[f"rounds_to_{tol:g}"] = rounds if column_error(plan, beta.double()) < tol else f">{MAX_ROUNDS}"
            plan, _ = official_sinkhorn(scores.double(), beta.double(), 0.05, 3)
            entry["error_after_3"] = column_error(plan, beta.double())
            results.append(entry)
    return results


def stability_rows(device):
    """Finite or not, and error against float64 log-domain rounds, for small epsilon and low precision."""
    scores64, beta64 = realistic_problem(10_000, 65, device, seed=2)
    scores64 = scores64.double()
    scores64[0] = 1.0  # the largest cosine similarity is 1
    beta64 = beta64.double()
    rows = []
    for epsilon in (0.05, 0.01, 0.005, 0.001):
        reference = sinkhorn(scores64, beta64, epsilon, 3)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            scores, beta = scores64.to(dtype), beta64.to(dtype)
            for name in METHODS:
                rows.append(stability_entry(name, scores, beta, epsilon, dtype, reference))
    return rows


def stability_entry(name, scores, beta, epsilon, dtype, reference):
    entry = {"method": name, "epsilon": epsilon, "dtype": str(dtype).replace("torch.", "")}
    try:
        plan, _ = METHODS[name](scores, beta, epsilon, 3)
    except Exception as error:  # POT refuses some dtypes; report, do not stop the run
        return {**entry, "finite": None, "max_error": None, "error": f"{type(error).__name__}: {error}"[:120]}
    finite = bool(torch.isfinite(plan).all())
    max_error = (plan.double() - reference).abs().max().item() if finite else None
    return {**entry, "finite": finite, "max_error": max_error, "error": None}


#: A converged ratio whose two methods ran more than this factor apart in rounds compares stopping rules.
ROUNDS_APART = 2


def speed_markdown(rows):
    by_key = {(r["N"], r["K"], r["mode"], r["method"]): r for r in rows}
    table, apart = [], False
    for (n, k, mode, name), row in by_key.items():
        if name != "sinkhorn":
            continue
        cells = [n, k, mode]
        for other in METHODS:
            other_row = by_key.get((n, k, mode, other))
            cells.append(f"{other_row['seconds'] * 1e3:.1f} ms ({other_row['rounds']})" if other_row else "not run")
        for other in ("official", "pot_sinkhorn_log"):
            other_row = by_key.get((n, k, mode, other))
            flag = other_row is not None and _rounds_apart(row["rounds"], other_row["rounds"])
            apart |= flag
            cells.append(f"{other_row['seconds'] / row['seconds']:.2f}x" + (" †" if flag else "") if other_row else "-")
        table.append(cells)
    header = ["N", "K", "mode", *[f"{m} (rounds)" for m in METHODS], "official / sinkhorn", "pot_log / sinkhorn"]
    footnote = (
        f"\n† The two ran more than {ROUNDS_APART}x apart in rounds, each stopping by its own rule (POT's "
        "checks an L2 error every 10 rounds): the ratio compares the stopping rules more than the solvers.\n"
    )
    return markdown_table(header, table) + (footnote if apart else "")


def _rounds_apart(rounds: int, other: int) -> bool:
    return max(rounds, other) > ROUNDS_APART * max(min(rounds, other), 1)


def stability_markdown(rows):
    cell = {}
    for r in rows:
        if r["error"]:
            text = "error"
        elif not r["finite"]:
            text = "NaN/inf"
        else:
            text = f"finite, err {r['max_error']:.1e}"
        cell[(r["epsilon"], r["dtype"], r["method"])] = text
    keys = sorted({(e, d) for e, d, _ in cell}, key=lambda key: (-key[0], key[1]))
    table = [[e, d, *[cell[(e, d, m)] for m in METHODS]] for e, d in keys]
    return markdown_table(["epsilon", "input dtype", *METHODS], table)


def report_markdown(payload: dict) -> str:
    """The markdown report of a run's ``payload`` (also to re-render a stored JSON)."""
    return "\n".join([
        f"# sinkhorn benchmark\n\nCommand: `OMP_NUM_THREADS=1 {payload['command']}`\n",
        f"Machine: {payload['machine']}; torch threads {payload['torch_threads']}; float32; epsilon 0.05; "
        f"median of {payload['repeats']} repeats, methods interleaved (each repeat times every method once, looping a "
        f"fast call for >= {MIN_REPEAT_SECONDS * 1e3:.0f} ms); "
        f"realistic scores (L2-normalised 128-d bank around K prototypes, "
        f"imbalanced beta). POT runs only where N*K <= {payload['pot_max_entries']:.0e}; 'converged' = column error "
        f"< {payload['tol']:g} (POT: L2 error, checked every 10 rounds), only where N*K <= {CONVERGENCE_MAX_ENTRIES:.0e}.\n",
        "## Speed (median time, rounds in brackets)\n", speed_markdown(payload["speed"]),
        "## Rounds needed (epsilon 0.05, float64, same rounds as this package)\n",
        markdown_table(list(payload["rounds_to_converge"][0]),
                       [list(entry.values()) for entry in payload["rounds_to_converge"]]),
        "## Stability (3 rounds, N=10k, K=65, max score 1; error vs float64 log-domain rounds)\n",
        stability_markdown(payload["stability"]),
        (
            f"Wall time {payload['wall_seconds']:.0f} s; load average (1, 5, 15 min) before "
            f"{_load(payload['load_average_before'])}, after {_load(payload['load_average_after'])}.\n"
        ),
    ])


def _load(averages) -> str:
    return "/".join(f"{value:.2f}" for value in averages)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=available_device, default=torch.device("cpu"))
    parser.add_argument("--repeats", type=int_in(1), default=5)
    parser.add_argument(
        "--quick", action="store_true", help="N up to 10k only (a smoke run: written under results/smoke/)"
    )
    parser.add_argument("--out", help="results name under benchmarks/results (default bench_ot[_cuda])")
    parser.add_argument("--force", action="store_true", help="replace the published results even when another command made them")
    args = parser.parse_args()
    name = args.out or ("bench_ot_cuda" if args.device.type == "cuda" else "bench_ot")
    if not args.quick:  # a quick run writes under results/smoke/
        check_same_options(name, parser, args)
    logging.basicConfig(level=logging.INFO)
    device = args.device
    load_before = os.getloadavg()  # other processes on a shared machine: reported beside the times
    threads = pin_threads(1)
    sizes = SIZES[:2] if args.quick else SIZES
    started = time.perf_counter()
    speed = speed_rows(sizes, PROTOTYPES, args.repeats, device)
    convergence = rounds_to_converge(sizes[:2], PROTOTYPES, device)  # bank sizes of ProtoOT domains
    stability = stability_rows(device)
    where = f"{machine(device)}, torch {torch.__version__}, POT {pot.__version__}"
    payload = {
        "command": command_line(), "machine": where, **threads, "device": str(device), "dtype": "float32",
        "epsilon": 0.05, "repeats": args.repeats, "tol": TOL, "pot_max_entries": POT_MAX_ENTRIES,
        "speed": speed, "rounds_to_converge": convergence, "stability": stability,
        "wall_seconds": time.perf_counter() - started, "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    markdown = report_markdown(payload)
    json_path, md_path = write_results(name, payload, markdown, smoke=args.quick)
    logger.info("wrote %s and %s", json_path, md_path)
    print(markdown)


if __name__ == "__main__":
    main()
