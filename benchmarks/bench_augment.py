"""MoCo-v2 views per second: the PIL pipeline against ``MoCoV2Augment`` on whole batches.

Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_augment.py                  # CPU, one thread
    .venv/bin/python benchmarks/bench_augment.py --device cuda                      # GPU

Both make the two 224-px views of every item from the same pacs-mini images (the demo set
where ``../shared`` is absent): ``moco_v2_transform`` one PIL image at a time, as each
``DataLoader`` worker runs it, and ``MoCoV2Augment`` on batches of the images decoded once to
uint8 at 256 x 256, as ``accuracy.py --finetune --augment batched`` feeds it, the copy to the
device included. One process, torch on one CPU thread; median of interleaved rounds. The PIL
rate scales with worker processes at best; the batched rate is what one training process
gets. Writes ``benchmarks/results/bench_augment[_cuda].{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from _common import (
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
from pml_protoot import MoCoV2Augment, MultiDomainImageFolder, decode_transform, make_synthetic_domains, moco_v2_transform
from pml_protoot.augment import decoded_side

PACS_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "pacs-mini"
IMAGE_SIZE = 224


def load_images(count: int) -> tuple[list, str]:
    """``count`` RGB PIL images (cycled if the set is smaller) and where they came from."""
    if PACS_MINI.is_dir():
        dataset, source = MultiDomainImageFolder(PACS_MINI), "pacs-mini"
    else:
        dataset, source = make_synthetic_domains(image_size=IMAGE_SIZE), "the synthetic demo set"
    step = max(1, len(dataset) // count)  # spread over the domains
    return [dataset[(i * step) % len(dataset)][0] for i in range(count)], source


def pil_views(images: list, transform) -> None:
    for image in images:
        transform(image), transform(image)


def batched_views(decoded: torch.Tensor, augment: MoCoV2Augment, batch_size: int, device) -> None:
    for start in range(0, len(decoded), batch_size):
        batch = decoded[start : start + batch_size].to(device, non_blocking=True)
        augment(batch), augment(batch)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=available_device, default=torch.device("cpu"))
    parser.add_argument("--images", type=int_in(1), default=256, help="items per timed pass")
    parser.add_argument("--batch-size", type=int_in(1), default=128)
    parser.add_argument("--repeats", type=int_in(1), default=3)
    parser.add_argument("--out", help="results name under benchmarks/results (default bench_augment[_cuda])")
    parser.add_argument("--force", action="store_true", help="replace the published results even when another command made them")
    args = parser.parse_args(argv)
    name = args.out or ("bench_augment_cuda" if args.device.type == "cuda" else "bench_augment")
    check_same_options(name, parser, args)
    threads = pin_threads(1)
    started, load_before = time.perf_counter(), os.getloadavg()
    images, source = load_images(args.images)
    decode = decode_transform(IMAGE_SIZE)
    decoded = torch.stack([decode(image) for image in images])
    decoded = decoded.pin_memory() if args.device.type == "cuda" else decoded
    augment = MoCoV2Augment(IMAGE_SIZE).to(args.device)
    functions = {
        "moco_v2_transform (PIL, one image at a time)": lambda: pil_views(images, moco_v2_transform(IMAGE_SIZE)),
        f"MoCoV2Augment (batches of {args.batch_size}, {args.device.type})": lambda: batched_views(
            decoded, augment, args.batch_size, args.device
        ),
    }
    seconds = interleaved_median_seconds(functions, args.repeats, args.device)
    rows = [{"method": name, "items_per_s": args.images / s, "ms_per_item": 1e3 * s / args.images}
            for name, s in seconds.items()]
    payload = {
        "command": command_line(), "device": str(args.device), "source": source, "images": args.images,
        "batch_size": args.batch_size, "repeats": args.repeats, "threads": threads,
        "machine": machine(args.device), "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "wall_seconds": time.perf_counter() - started, "rows": rows,
    }
    json_path, md_path = write_results(name, payload, report(payload))
    print(report(payload))
    print(f"wrote {json_path} and {md_path}")
    return payload


def report(payload: dict) -> str:
    pil_rate = payload["rows"][0]["items_per_s"]
    table = markdown_table(
        ["method", "items/s (two views each)", "ms per item", "× PIL"],
        [[row["method"], f"{row['items_per_s']:.0f}", f"{row['ms_per_item']:.2f}", f"{row['items_per_s'] / pil_rate:.1f}"]
         for row in payload["rows"]],
    )
    where = payload["gpu"] or f"{payload['cpus']} CPUs"
    return (
        "# MoCo-v2 views per second\n\n"
        f"`{payload['command']}`\n\n"
        f"{payload['images']} images of {payload['source']}, two {IMAGE_SIZE}-px views each; {where} "
        f"({payload['machine']}), torch threads {payload['threads']['torch_threads']}, one process; median of "
        f"{payload['repeats']} interleaved rounds. Batched: images decoded once to uint8 {decoded_side(IMAGE_SIZE)} px "
        f"squares, copied to the device per batch. Load average before/after "
        f"{payload['load_average_before'][0]:.1f}/{payload['load_average_after'][0]:.1f}; wall "
        f"{payload['wall_seconds']:.0f} s.\n\n" + table
    )


if __name__ == "__main__":
    main()
