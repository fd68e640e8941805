"""One training step: ProtoOTTrainer vs PML MetricLossOnly + NTXentLoss on the same two views.

Both methods see the same batch (64 images per domain, 2 domains) as two augmented views,
both views through the trained model for NTXent (PML's self-supervised recipe); ProtoOT
runs the query view with gradient and the key view through its momentum encoder
without. Banks hold ``--bank-sizes`` samples per domain (random unit keys written
directly: the step cost, not the bank filling, is measured). ProtoOT is timed exact
(``refresh_every=1``, ``neighbour_search="exact"``) and scaled (``--refresh-every`` R and
``--neighbour-search``, "auto" = faiss IVF from 100k rows with refresh_every > 1); a refresh step is one of
every R, so the amortised per-step time is the mean over R consecutive steps (reported
beside the median). The training steps are timed in interleaved rounds (every round times
one step of every trainer), so that the load of a shared machine hits all settings alike
and the ratios stay meaningful. Images are random tensors made per item (data loading is
negligible).

A profile (``--profile-steps``, after the timed rounds) says where a step's time goes for the
NTXent trainer and the ProtoOT trainers at the smallest bank: per step, the time the device
ran work (CUDA: kernels and copies; CPU: the operators' own time), its number of kernels
(CUDA) or operator calls (CPU), and the operators that took most of it.

A second table times the memory's methods alone (forward + backward on random queries and
keys, no CNN): ``ProtoOTLoss``, and ``ProtoOTMiner(update_prototypes=True)`` mining for PML's
``NTXentLoss`` (the keys written first, as ``ProtoOTTrainer`` does), which steps the memory
as the loss does. It shows the memory's own scaling with the bank size, and reports the
IVF's recall@1 against the exact neighbour search on the last batch's keys (random unit
keys: no cluster structure, the IVF's worst case; the miner searches no neighbours).

CPU:  python benchmarks/bench_step.py --warmup 1 --steps 5   (resnet18, 112 px; the published table)
GPU:  python benchmarks/bench_step.py --device cuda --trunk resnet50 --image-size 224 --name bench_step_cuda
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm
from pytorch_metric_learning.losses import NTXentLoss
from pytorch_metric_learning.trainers import MetricLossOnly

from _common import (
    available_device,
    check_same_options,
    command_line,
    configure_logging,
    cpu_model,
    device_name,
    int_in,
    machine,
    markdown_table,
    peak_rss_mb,
    pin_threads,
    synchronize,
    write_results,
)
from pml_protoot.backbones import create_trunk, embedding_head
from pml_protoot.losses import ProtoOTLoss
from pml_protoot.memory import PrototypeMemory, exact_nearest_rows
from pml_protoot.miners import ProtoOTMiner
from pml_protoot.samplers import CrossDomainSampler
from pml_protoot.trainers import ProtoOTTrainer

logger = logging.getLogger("bench_step")

NUM_DOMAINS = 2
#: What the no-CNN table times, each a step of the memory: ProtoOT's loss, or the miner for a PML loss.
MEMORY_METHODS = ("ProtoOTLoss", "ProtoOTMiner + NTXentLoss")
#: Operators the profile lists per trainer, those with the most device time first.
PROFILED_OPS = 5


class RandomTwoViews(torch.utils.data.Dataset):
    """Item ``i``: ``((view_1, view_2), i)``, random images seeded by ``i`` (made on access)."""

    def __init__(self, size: int, image_size: int):
        self.size, self.image_size = size, image_size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        views = torch.randn(2, 3, self.image_size, self.image_size, generator=generator)
        return (views[0], views[1]), index


def both_views_with_labels(items):
    """Collate for NTXent: the 2B views as one batch, each view labelled by its sample index."""
    first = torch.stack([views[0] for views, _ in items])
    second = torch.stack([views[1] for views, _ in items])
    indices = torch.tensor([index for _, index in items])
    return torch.cat([first, second]), torch.cat([indices, indices])


def models(args):
    trunk, num_features = create_trunk(args.trunk)
    trunk = trunk.to(args.device)
    embedder = embedding_head(num_features).to(args.device)
    optimizers = {
        f"{name}_optimizer": torch.optim.Adam(model.parameters(), lr=2.5e-4, amsgrad=True, weight_decay=5e-4)
        for name, model in (("trunk", trunk), ("embedder", embedder))
    }
    return {"trunk": trunk, "embedder": embedder}, optimizers


def time_step(trainer, device) -> float:
    """Seconds of one ``forward_and_backward`` (the optimizer step included), synchronised on CUDA."""
    synchronize(device)
    start = time.perf_counter()
    trainer.forward_and_backward()
    synchronize(device)
    return time.perf_counter() - start


def ntxent_trainer(args) -> MetricLossOnly:
    total = args.batch_per_domain * NUM_DOMAINS * 4
    dataset = RandomTwoViews(total, args.image_size)
    model_dict, optimizers = models(args)
    trainer = MetricLossOnly(
        model_dict, optimizers, args.batch_per_domain * NUM_DOMAINS, {"metric_loss": NTXentLoss(0.2)}, dataset,
        data_device=args.device, dataloader_num_workers=0, collate_fn=both_views_with_labels,
    )
    trainer.initialize_dataloader()
    trainer.dataloader_iter = iter(trainer.dataloader)
    trainer.set_to_train()
    return trainer


def filled_memory(args, bank_size: int, refresh_every: int, neighbour_search: str) -> PrototypeMemory:
    domains = torch.arange(NUM_DOMAINS).repeat_interleave(bank_size)
    memory = PrototypeMemory(domains, 128, args.num_prototypes, kmeans_niter=10, kmeans_nredo=1,
                             refresh_every=refresh_every, neighbour_search=neighbour_search,
                             ivf_nprobe=args.ivf_nprobe).to(args.device)
    for slot in range(NUM_DOMAINS):  # random unit keys, written per domain to bound peak memory
        indices = torch.arange(slot * bank_size, (slot + 1) * bank_size)
        memory.fill(F.normalize(torch.randn(bank_size, 128, device=args.device), dim=1), indices)
    return memory


def protoot_trainer(args, bank_size: int, refresh_every: int, neighbour_search: str) -> ProtoOTTrainer:
    memory = filled_memory(args, bank_size, refresh_every, neighbour_search)
    domains = memory.domain_of.cpu()
    model_dict, optimizers = models(args)
    batch_size = args.batch_per_domain * NUM_DOMAINS
    trainer = ProtoOTTrainer(
        model_dict, optimizers, batch_size, {"metric_loss": ProtoOTLoss(memory, cross_domain_start_epoch=0)},
        RandomTwoViews(len(domains), args.image_size), memory,
        sampler=CrossDomainSampler(domains, batch_size), data_device=args.device, dataloader_num_workers=0,
    )
    trainer.initialize_dataloader()
    trainer.epoch = 1
    trainer.start_epoch()  # K-means, first prototypes, IVF build: once an epoch, not part of a step
    return trainer


def interleaved_step_times(trainers: dict, warmup: int, rounds: int, device) -> dict:
    """Per trainer, the times of ``rounds`` steps; each round steps every trainer once, so load hits all alike."""
    for _ in range(warmup):
        for trainer in trainers.values():
            time_step(trainer, device)
    times = {key: [] for key in trainers}
    for _ in tqdm(range(rounds), desc="interleaved rounds"):
        for key, trainer in trainers.items():
            times[key].append(time_step(trainer, device))
    return times


def profile_steps(trainer, steps: int, device) -> dict:
    """Where ``steps`` more (warm) steps of ``trainer`` spend their time, per step (``profile_summary``)."""
    on_cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]) as profiler:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.forward_and_backward()
        synchronize(device)
        wall_s = time.perf_counter() - start
    return {"wall_ms": 1e3 * wall_s / steps, **profile_summary(profiler.key_averages(), on_cuda, steps)}


def profile_summary(averages, on_cuda: bool, steps: int) -> dict:
    """Per step: ``work_ms``, the device's busy time (CUDA: kernels and copies; CPU: the aten operators'
    own time), ``launches`` (CUDA kernels and copies; CPU: aten operator calls) and ``top_ops``, the
    :data:`PROFILED_OPS` aten operators with the most of that time (their own, their children's apart)."""
    def busy_us(average):
        return average.self_device_time_total if on_cuda else average.self_cpu_time_total

    operators = [average for average in averages if average.key.startswith("aten::")]
    # A record_function range (the optimizer's step) also has a CUDA row spanning its kernels: not work of its own.
    work = [average for average in averages if average.device_type == DeviceType.CUDA
            and not getattr(average, "is_user_annotation", False)] if on_cuda else operators
    top = sorted(operators, key=busy_us, reverse=True)[:PROFILED_OPS]
    return {
        "work_ms": sum(map(busy_us, work)) / 1e3 / steps,
        "launches": sum(average.count for average in work) / steps,
        "top_ops": [{"op": op.key, "ms": busy_us(op) / 1e3 / steps, "calls": op.count / steps} for op in top],
    }


def memory_step(method: str, memory: PrototypeMemory):
    """``step(queries, indices, keys) -> loss`` of one of :data:`MEMORY_METHODS`."""
    if method == "ProtoOTLoss":
        loss_func = ProtoOTLoss(memory, cross_domain_start_epoch=0)
        return lambda queries, indices, keys: loss_func(queries, indices, ref_emb=keys)
    miner, loss_func = ProtoOTMiner(memory, update_prototypes=True), NTXentLoss()

    def mine_then_contrast(queries, indices, keys):
        memory.fill(keys, indices)
        return loss_func(queries, indices, miner(queries, indices, keys), ref_emb=keys)
    return mine_then_contrast


def loss_only_step(args, method: str, bank_size: int, refresh_every: int, neighbour_search: str) -> dict:
    """Time a memory method's forward + backward alone; recall@1 of the memory's search vs exact (last batch)."""
    memory = filled_memory(args, bank_size, refresh_every, neighbour_search)
    memory.recluster(epoch=0)
    step_loss = memory_step(method, memory)
    batch = args.batch_per_domain
    times = []
    for step in range(args.warmup + max(args.loss_only_steps, refresh_every)):
        indices = torch.cat([torch.randint(0, bank_size, (batch,)) + slot * bank_size for slot in range(NUM_DOMAINS)])
        queries = torch.randn(len(indices), 128, device=args.device, requires_grad=True)
        keys = F.normalize(torch.randn(len(indices), 128, device=args.device), dim=1)
        synchronize(args.device)  # the random inputs are not part of the step, as in time_step
        start = time.perf_counter()
        step_loss(queries, indices.to(args.device), keys).backward()
        synchronize(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if method != "ProtoOTLoss":  # the miner searches no neighbours
        return {**summarise(times), "ivf": False, "recall_at_1": None}
    own_rows = memory.row_of[indices[:batch].to(args.device)]
    found = memory.nearest_rows(0, keys[:batch], own_rows)
    recall = float((found == exact_nearest_rows(keys[:batch], memory.bank(0), own_rows)).float().mean())
    return {**summarise(times), "ivf": memory.uses_ivf(0), "recall_at_1": recall}


def summarise(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "steps": len(times),
            "times_s": times}


def main(args):
    configure_logging()
    load_before = os.getloadavg()  # other processes on a shared machine: reported beside the times
    started = time.perf_counter()
    threads = pin_threads(args.threads)
    torch.manual_seed(0)
    settings = [(1, "exact"), (args.refresh_every, args.neighbour_search)]
    loss_only = {}
    for method in MEMORY_METHODS:
        for bank_size in args.bank_sizes:
            for refresh_every, neighbour_search in settings:
                key = f"{method}_bank{bank_size}_refresh{refresh_every}_{neighbour_search}"
                loss_only[key] = {"method": method, "bank_size": bank_size, "refresh_every": refresh_every,
                                  "neighbour_search": neighbour_search,
                                  **loss_only_step(args, method, bank_size, refresh_every, neighbour_search)}
                logger.info("%s: mean %.1f ms a step", key, 1e3 * loss_only[key]["mean_s"])
    results, trainers = {}, {}
    if not args.loss_only:
        trainers, settings_of = {"ntxent": ntxent_trainer(args)}, {"ntxent": {}}
        for bank_size in args.trainer_bank_sizes:
            for refresh_every, neighbour_search in settings:
                key = f"protoot_bank{bank_size}_refresh{refresh_every}_{neighbour_search}"
                trainers[key] = protoot_trainer(args, bank_size, refresh_every, neighbour_search)
                settings_of[key] = {"bank_size": bank_size, "refresh_every": refresh_every,
                                    "neighbour_search": neighbour_search}
        times = interleaved_step_times(trainers, args.warmup, max(args.steps, args.refresh_every), args.device)
        results = {key: {**settings_of[key], **summarise(times[key])} for key in trainers}
    payload = {
        "command": command_line(), "machine": machine(args.device), "processor": cpu_model(),
        "device": device_name(args.device), **threads, "trunk": args.trunk, "image_size": args.image_size,
        "batch_per_domain": args.batch_per_domain, "num_domains": NUM_DOMAINS,
        "num_prototypes": args.num_prototypes, "ivf_nprobe": args.ivf_nprobe, "peak_rss_mb": peak_rss_mb(),
        "results": results, "loss_only": loss_only, "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "wall_seconds": time.perf_counter() - started,
    }
    paths = write_results(args.name, payload, report(payload))
    profiled = {key: trainer for key, trainer in trainers.items()
                if results[key].get("bank_size", min(args.trainer_bank_sizes)) == min(args.trainer_bank_sizes)}
    if args.profile_steps and profiled:  # after the timings are written: the profile is extra, never their cost
        payload["profiles"] = {key: profile_steps(trainer, args.profile_steps, args.device)
                               for key, trainer in profiled.items()}
        paths = write_results(args.name, payload, report(payload))
    print(report(payload))
    logger.info("wrote %s and %s", *paths)


def report(payload: dict) -> str:
    results, loss_only = payload["results"], payload["loss_only"]
    text = (
        f"# bench_step\n\n`{payload['command']}`\n\n"
        f"Machine: {payload['machine']} ({payload['device']}), torch threads {payload['torch_threads']}, faiss "
        f"threads {payload['faiss_threads']}. {payload['trunk']} at {payload['image_size']} px, "
        f"{payload['batch_per_domain']} images x {payload['num_domains']} domains, K = {payload['num_prototypes']}, "
        f"IVF nprobe {payload['ivf_nprobe']} of sqrt(N) lists, peak RSS {payload['peak_rss_mb']:.0f} MiB. Mean over "
        ">= refresh_every steps is the amortised cost; 'x smallest bank' divides by the same setting's mean at the "
        "smallest bank, 'x exact smallest' by the exact setting's (refresh_every 1, exact search) mean there.\n\n"
        f"Load average (1, 5, 15 min) before {_load(payload['load_average_before'])}, after "
        f"{_load(payload['load_average_after'])}; wall time {payload['wall_seconds'] / 60:.1f} min.\n\n"
    )
    if results:
        ntxent = results["ntxent"]["median_s"]
        trainer = {key: value for key, value in results.items() if key != "ntxent"}
        rows = [["NTXent (MetricLossOnly, 2 views)", "-", "-", "-", f"{ntxent:.3f}",
                 f"{results['ntxent']['mean_s']:.3f}", "1.00", "-", "-"]]
        rows += [["ProtoOTTrainer", *cells, f"{value['mean_s'] / ntxent:.2f}", *ratios]
                 for cells, value, ratios in _rows_with_ratios(trainer)]
        header = ["method", "bank / domain", "refresh_every", "neighbour_search", "median step (s)", "mean step (s)",
                  "mean / NTXent median", "x smallest bank", "x exact smallest"]
        text += "## Training step (ProtoOTTrainer, CNN included)\n\n" + markdown_table(header, rows) + "\n"
    if payload.get("profiles"):
        text += _profile_section(payload["profiles"], payload["device"])
    rows = [[value.get("method", "ProtoOTLoss"), *cells, "yes" if value["ivf"] else "no", _recall(value), *ratios]
            for cells, value, ratios in _rows_with_ratios(loss_only)]
    header = ["method", "bank / domain", "refresh_every", "neighbour_search", "median (s)", "mean (s)", "IVF used",
              "recall@1 vs exact", "x smallest bank", "x exact smallest"]
    return text + "## The memory's methods alone (forward + backward, no CNN)\n\n" + markdown_table(header, rows)


def _profile_section(profiles: dict, device: str) -> str:
    cuda = device.startswith("cuda")
    work, launches = ("kernel time", "kernels") if cuda else ("operator time (own)", "operator calls")
    header = ["trainer", "wall / step (ms)", f"{work} / step (ms)", f"{launches} / step",
              "top operators (ms / step, calls / step)"]
    rows = [[key, f"{value['wall_ms']:.1f}", f"{value['work_ms']:.1f}", f"{value['launches']:.0f}",
             "; ".join(f"{op['op']} {op['ms']:.1f} ({op['calls']:.0f})" for op in value["top_ops"])]
            for key, value in profiles.items()]
    return ("## Where a step's time goes (torch.profiler, smallest bank)\n\n" + markdown_table(header, rows) + "\n"
            "The profiler's own overhead is in the wall time; an operator's time excludes its children's.\n\n")


def _recall(value: dict) -> str:
    return "-" if value["recall_at_1"] is None else f"{value['recall_at_1']:.2f}"


def _load(averages) -> str:
    return "/".join(f"{value:.2f}" for value in averages)


def _rows_with_ratios(results: dict):
    """Yield (setting and time cells, result, ratio cells) per result, ratios against the same method's
    smallest bank (results without a method, the trainer's and older files', are one method)."""
    smallest = min(value["bank_size"] for value in results.values())
    base = {(v.get("method"), v["refresh_every"], v["neighbour_search"]): v["mean_s"]
            for v in results.values() if v["bank_size"] == smallest}
    for value in results.values():
        setting = (value["refresh_every"], value["neighbour_search"])
        method = value.get("method")
        cells = [value["bank_size"], *setting, f"{value['median_s']:.3f}", f"{value['mean_s']:.3f}"]
        yield cells, value, [f"{value['mean_s'] / base[(method, *setting)]:.2f}",
                             f"{value['mean_s'] / base[(method, 1, 'exact')]:.2f}"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=available_device, default=torch.device("cpu"))
    parser.add_argument("--trunk", default="resnet18")
    parser.add_argument("--image-size", type=int_in(1), default=112)
    parser.add_argument("--batch-per-domain", type=int_in(1), default=64)
    parser.add_argument("--bank-sizes", type=int_in(1), nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="banks of the ProtoOTLoss-only table")
    parser.add_argument("--trainer-bank-sizes", type=int_in(1), nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="banks of the training-step table (all trainers live at once: memory)")
    parser.add_argument("--refresh-every", type=int_in(1), default=10)
    parser.add_argument("--neighbour-search", choices=["exact", "ivf", "auto"], default="auto")
    parser.add_argument("--ivf-nprobe", type=int_in(1), default=32)
    parser.add_argument("--loss-only-steps", type=int_in(1), default=20)
    parser.add_argument("--loss-only", action="store_true", help="only the table of the memory's methods (no CNN, no trainers)")
    parser.add_argument("--num-prototypes", type=int_in(2), default=7)
    parser.add_argument("--threads", type=int_in(1), default=1)
    parser.add_argument("--warmup", type=int_in(0), default=2)
    parser.add_argument("--steps", type=int_in(1), default=5)
    parser.add_argument("--profile-steps", type=int_in(0), default=3,
                        help="steps profiled per trainer at the smallest bank, after the timed ones (0: none)")
    parser.add_argument("--name", default="bench_step", help="results name under benchmarks/results")
    parser.add_argument("--force", action="store_true", help="replace the published results even when another command made them")
    return parser


if __name__ == "__main__":
    parser = build_parser()
    args = parser.parse_args()
    check_same_options(args.name, parser, args, option="--name")
    main(args)
