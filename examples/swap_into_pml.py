"""PML's canonical ``MetricLossOnly`` script and its ProtoOT version, side by side.

``pml_baseline()`` is the usual pytorch-metric-learning recipe: a timm trunk, an MLP
embedder, ``NTXentLoss`` on class labels, ``MPerClassSampler``, ``MetricLossOnly``.
``protoot_swap()`` is the same script with the smallest change that makes it ProtoOT:
every changed line is marked ``# ProtoOT:``. Nothing there reads a class label; labels
are used only by the tester, to score retrieval.

Both run on the embedded demo set (shape classes drawn in two styles, no download) and
are scored with the same ``CrossDomainTester`` (every ordered domain pair, ProtoOT's
P@k), so their tables compare. The supervised baseline sees the class labels, ProtoOT
does not.

Each script trains one epoch; by default that epoch is one pass of its sampler (PML's
``iterations_per_epoch=None`` is ``len(dataloader)``: 8 batches of ``MPerClassSampler``,
10 domain-balanced blocks of ``CrossDomainSampler`` on the 300 demo images).
``--iterations N`` sets the epoch's length for both: fewer steps than a pass stop early,
more run further passes within the epoch, each in a fresh order.

Run::

    python examples/swap_into_pml.py                  # one pass each
    python examples/swap_into_pml.py --iterations 30  # three passes of CrossDomainSampler
"""
import argparse

import timm
import torch
from pytorch_metric_learning import losses, samplers, trainers

from pml_protoot import (
    CrossDomainSampler,
    CrossDomainTester,
    PrecisionAtKCalculator,
    ProtoOTLoss,
    ProtoOTTrainer,
    PrototypeMemory,
    TwoViewDataset,
    embedding_head,
    eval_transform,
    make_synthetic_domains,
    moco_v2_transform,
)

IMAGE_SIZE = 32
BATCH_SIZE = 32


def make_models_and_optimizers(device: torch.device):
    """The same trunk, embedder and optimizers for both scripts, on ``device`` (PML's trainers never move models)."""
    trunk = timm.create_model("resnet10t", num_classes=0).to(device)
    embedder = embedding_head(trunk.num_features, out_dim=128).to(device)
    optimizers = {
        "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=1e-3, weight_decay=5e-4, amsgrad=True),
        "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=1e-3, weight_decay=5e-4, amsgrad=True),
    }
    return {"trunk": trunk, "embedder": embedder}, optimizers


def score(trunk, embedder, device):
    """Cross-domain P@k of ``embedder(trunk(x))`` on the demo's eval view, every domain pair."""
    eval_images = make_synthetic_domains(image_size=IMAGE_SIZE, transform=eval_transform(IMAGE_SIZE))
    dataset_dict = {domain: eval_images.subset(domain) for domain in eval_images.domains}
    metrics = ("precision_at_1", "precision_at_5", "precision_at_15", "mean_average_precision_at_r")
    tester = CrossDomainTester(PrecisionAtKCalculator(include=metrics), dataloader_num_workers=0)
    results = tester.test(dataset_dict, 1, trunk.to(device), embedder.to(device))
    print(tester.summary_table(results))
    return results


def pml_baseline(iterations, device: torch.device):
    """PML's canonical supervised script (``iterations=None``: one sampler pass); returns ``(trainer, results)``."""
    train_dataset = make_synthetic_domains(image_size=IMAGE_SIZE, transform=moco_v2_transform(IMAGE_SIZE))
    models, optimizers = make_models_and_optimizers(device)
    loss = losses.NTXentLoss(temperature=0.07)
    sampler = samplers.MPerClassSampler(train_dataset.targets, m=8, length_before_new_iter=len(train_dataset))
    trainer = trainers.MetricLossOnly(
        models,
        optimizers,
        batch_size=BATCH_SIZE,
        loss_funcs={"metric_loss": loss},
        dataset=train_dataset,
        sampler=sampler,
        iterations_per_epoch=iterations,
        data_device=device,
        dataloader_num_workers=0,
    )
    trainer.train(num_epochs=1)
    return trainer, score(models["trunk"], models["embedder"], device)


def protoot_swap(iterations, device: torch.device):
    """The same script, ProtoOT: no labels, a memory, two views, a domain sampler; returns ``(trainer, results)``."""
    images = make_synthetic_domains(image_size=IMAGE_SIZE)  # ProtoOT: PIL images; two views come below
    eval_images = make_synthetic_domains(image_size=IMAGE_SIZE, transform=eval_transform(IMAGE_SIZE))  # ProtoOT
    train_dataset = TwoViewDataset(images, moco_v2_transform(IMAGE_SIZE), moco_v2_transform(IMAGE_SIZE))  # ProtoOT
    models, optimizers = make_models_and_optimizers(device)
    memory = PrototypeMemory(images.domain_ids, dim=128, num_prototypes=len(images.classes))  # ProtoOT
    loss = ProtoOTLoss(memory)  # ProtoOT: replaces NTXentLoss
    sampler = CrossDomainSampler(images.domain_ids, batch_size=BATCH_SIZE)  # ProtoOT: replaces MPerClassSampler
    trainer = ProtoOTTrainer(  # ProtoOT: replaces trainers.MetricLossOnly
        models,
        optimizers,
        batch_size=BATCH_SIZE,
        loss_funcs={"metric_loss": loss},
        dataset=train_dataset,
        memory=memory,  # ProtoOT
        fill_dataset=eval_images,  # ProtoOT: fills the memory banks before training
        sampler=sampler,
        iterations_per_epoch=iterations,
        data_device=device,
        dataloader_num_workers=0,
    )
    trainer.train(num_epochs=1)
    return trainer, score(*trainer.key_encoder.module, device)  # ProtoOT: score the momentum key encoder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--iterations", type=int, default=None,
        help="training steps of each script (default: one pass of its sampler, len(dataloader))",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:  # PML would take 0 for a pass and -3 for no step
        parser.error(f"--iterations must be at least 1, got {args.iterations}")
    device = torch.device(args.device)
    steps = "one pass of its sampler" if args.iterations is None else f"{args.iterations} iterations"
    torch.manual_seed(0)
    print(f"PML MetricLossOnly + NTXentLoss (class labels), {steps}:")
    pml_baseline(args.iterations, device)
    torch.manual_seed(0)
    print(f"ProtoOT (no labels), {steps}:")
    protoot_swap(args.iterations, device)


if __name__ == "__main__":
    main()
