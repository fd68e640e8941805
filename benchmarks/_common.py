"""Small helpers shared by the benchmarks: logging, thread pinning, peak memory, interleaved timing, JSON + markdown output."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

from pml_protoot._files import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOKE_DIR = RESULTS_DIR / "smoke"  # ignored by git: a smoke run never replaces the published results
MIN_REPEAT_SECONDS = 0.02


def configure_logging() -> None:
    """INFO logs of the benchmark; the package's and PML's per-epoch and per-run logs would drown them."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pml_protoot").setLevel(logging.WARNING)
    logging.getLogger("PML").setLevel(logging.ERROR)  # e.g. "optimizers is missing trunk_optimizer": a frozen trunk


def pin_threads(num_threads: int = 1) -> dict:
    """Pin torch and faiss to ``num_threads`` OpenMP threads; return what was set, for the report."""
    import faiss
    import torch

    torch.set_num_threads(num_threads)
    faiss.omp_set_num_threads(num_threads)
    return {"torch_threads": torch.get_num_threads(), "faiss_threads": num_threads}


def device_name(device) -> str:
    """``"cpu"``, or e.g. ``"cuda: NVIDIA H200"``: the results name the accelerator they ran on."""
    import torch

    device = torch.device(device)
    return f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else str(device)


def machine(device="cpu") -> str:
    """Where a result was measured, e.g. ``"Linux-6.18-x86_64-with-glibc2.36, AMD EPYC 7B13, 2 CPUs (cpu)"``:
    speed ratios differ between CPU models (bfloat16 and AVX-512 support, cache sizes), so results name it."""
    return f"{platform.platform()}, {cpu_model()}, {os.cpu_count()} CPUs ({device_name(device)})"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux); else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def command_line() -> str:
    """This process's command, quoted as a shell needs it (method names hold spaces and ``+``)."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def int_in(low: int, high: int | None = None):
    """An argparse ``type``: an integer in ``[low, high]`` (no upper bound when ``high`` is None), so that
    a bad value ends in argparse's error naming the option, before any work."""
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def available_device(text: str):
    """An argparse ``type``: a ``torch.device`` this machine has, so that ``--device cuda`` without a GPU
    ends in argparse's one-line error naming the option, not in a traceback after the setup."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda:0, got {text!r}") from err
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no {device.type} device (torch "
                                         f"{torch.__version__}, torch.{device.type}.is_available() is not True)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_same_options(name: str, parser: argparse.ArgumentParser, args: argparse.Namespace,
                      option: str = "--out") -> None:
    """Refuse, before any timing, to replace ``results/<name>.json`` that was made with other option
    values (a smoke run's small sizes would silently replace a published table); ``--force`` replaces it.
    The recorded command is parsed by ``parser``, so option order and spelled-out defaults do not count.

    Raises:
        SystemExit: naming the recorded command and the options that write elsewhere or replace.
    """
    path = RESULTS_DIR / f"{name}.json"
    if args.force or not path.exists():
        return
    stored = json.loads(path.read_text()).get("command", "")
    if _option_values(parser, shlex.split(stored)[2:], option) != _option_values(parser, None, option, args):
        raise SystemExit(
            f"{path} was made by `{stored}`, with other options than this command's: pass {option} NAME to "
            "write beside it, or --force to replace it"
        )


def _option_values(parser, words, option: str, args=None) -> dict | None:
    """The option values of ``words`` (or of ``args``), without ``--force`` and ``option``; None when
    ``words`` do not parse (a command of an older version of the script)."""
    if args is None:
        try:
            args = parser.parse_args(words)
        except SystemExit:
            return None
    ignored = {"force", option.lstrip("-").replace("-", "_")}
    return {key: str(value) for key, value in vars(args).items() if key not in ignored}


def write_results(name: str, payload: dict, markdown: str, *, smoke: bool = False) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (under ``results/smoke/`` for a smoke run);
    return both paths."""
    folder = SMOKE_DIR if smoke else RESULTS_DIR
    return write_json_and_markdown(folder / name, payload, markdown)


def write_json_and_markdown(prefix: Path, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``<prefix>.json`` and ``<prefix>.md`` atomically (a run cut off mid-write, e.g. by a device's
    timeout, leaves the previous files readable, as ``--resume`` needs); return both paths."""
    json_path, md_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
    with atomic_write(json_path, "w") as file:
        file.write(json.dumps(payload, indent=2) + "\n")
    with atomic_write(md_path, "w") as file:
        file.write(markdown)
    return json_path, md_path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def synchronize(device):
    """Wait for ``device``'s queued kernels (CUDA runs asynchronously), so timers see them."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_median_seconds(functions: dict, repeats, device) -> dict:
    """Median over ``repeats`` of the seconds per call of every function, timed in rounds.

    Each round times every function once, so the load of a shared machine hits all of them
    alike and their ratios stay meaningful. A function's turn loops over enough calls to last
    at least ``MIN_REPEAT_SECONDS``: a single sub-millisecond call is mostly timer, cache and
    scheduler noise.
    """
    calls = {name: max(1, math.ceil(MIN_REPEAT_SECONDS / _seconds(f, 1, device))) for name, f in functions.items()}
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(_seconds(function, calls[name], device))
    return {name: statistics.median(values) for name, values in times.items()}


def _seconds(function, calls, device):
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / calls
