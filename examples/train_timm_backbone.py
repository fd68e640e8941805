"""Train ProtoOT end to end with any timm backbone, on your image folder or the demo set.

The library pieces, wired by hand (``protoot train`` does the same and more: feature
caching with ``--freeze-trunk``, JSON outputs, ``protoot eval``):

* ``create_trunk(name)``: any timm model without its classifier, plus ``embedding_head``
  started at the principal components of the trunk's features (``pca_init_``);
* ``MultiDomainImageFolder(root, domains)`` (``<root>/<domain>/<class>/<image>``) or the
  synthetic demo set; ``TwoViewDataset`` gives two MoCo-v2 views and the sample index;
* ``PrototypeMemory``, ``ProtoOTLoss``, ``CrossDomainSampler``, ``ProtoOTTrainer``;
* ``CrossDomainTester`` scores the momentum key encoder on every ordered domain pair.

Run::

    python examples/train_timm_backbone.py --backbone resnet18 --epochs 5
    python examples/train_timm_backbone.py --backbone vit_tiny_patch16_224 --epochs 5  # 224x224, its only size
    python examples/train_timm_backbone.py --data ~/OfficeHome --domains Art Clipart \\
        --backbone resnet50 --pretrained --image-size 224 --epochs 200 --batch-size 128
"""
import argparse

import timm
import torch

from pml_protoot import (
    CrossDomainSampler,
    CrossDomainTester,
    MultiDomainImageFolder,
    PrecisionAtKCalculator,
    ProtoOTLoss,
    ProtoOTTrainer,
    PrototypeMemory,
    TwoViewDataset,
    create_trunk,
    embedding_head,
    eval_transform,
    fixed_input_size,
    make_synthetic_domains,
    moco_v2_transform,
    pca_init_,
    trunk_features,
)


def load_images(data, domains, image_size, transform=None):
    """Your folder, or the demo set drawn at ``image_size``."""
    if data is None:
        return make_synthetic_domains(image_size=image_size, transform=transform)
    return MultiDomainImageFolder(data, domains, transform=transform)


def score(tester, eval_images, encoder):
    dataset_dict = {domain: eval_images.subset(domain) for domain in eval_images.domains}
    results = tester.test(dataset_dict, 0, encoder)
    print(tester.summary_table(results))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18", help="any timm model name")
    parser.add_argument("--weights", help="local state dict of that model (strict key check)")
    parser.add_argument("--pretrained", action="store_true", help="timm hub weights (needs internet)")
    parser.add_argument("--data", help="folder of <domain>/<class>/<image> (default: the demo set)")
    parser.add_argument("--domains", nargs="+", help="domain folders (default: all)")
    parser.add_argument("--image-size", type=int, help="default: 64, or the size timm builds a ViT or Swin for")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="images per step, all domains together")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--iterations", type=int, help="steps per epoch (default: one pass over the largest domain)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for option in ("epochs", "iterations"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1, got {getattr(args, option)}")
    # ViTs and Swin take only the size timm builds them for; 64 keeps other backbones quick on a CPU.
    size = args.image_size if args.image_size is not None else (fixed_input_size(args.backbone) or (64,))[0]
    device = torch.device(args.device)
    torch.manual_seed(0)

    trunk, feature_dim = create_trunk(args.backbone, pretrained=args.pretrained, weights=args.weights)
    embedder = embedding_head(feature_dim, out_dim=128)
    data_config = timm.data.resolve_data_config(model=trunk)
    mean, std = data_config["mean"], data_config["std"]
    images = load_images(args.data, args.domains, size)
    eval_images = load_images(args.data, args.domains, size, transform=eval_transform(size, mean, std))
    views = moco_v2_transform(size, mean, std)
    pca_init_(embedder, trunk_features(trunk.to(device), eval_images))  # the untrained trunk's features

    memory = PrototypeMemory(images.domain_ids, dim=128, num_prototypes=len(images.classes))
    trainer = ProtoOTTrainer(
        {"trunk": trunk.to(device), "embedder": embedder.to(device)},
        {  # PML's convention, one optimizer per model (Adam is per-parameter: the same as one over both)
            f"{name}_optimizer": torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=5e-4, amsgrad=True)
            for name, model in (("trunk", trunk), ("embedder", embedder))
        },
        batch_size=args.batch_size,
        loss_funcs={"metric_loss": ProtoOTLoss(memory, cross_domain_start_epoch=args.epochs // 2)},
        dataset=TwoViewDataset(images, views, views),
        memory=memory,
        sampler=CrossDomainSampler(images.domain_ids, args.batch_size),
        fill_dataset=eval_images,
        momentum=0.99,
        iterations_per_epoch=args.iterations,
        data_device=device,
        dataloader_num_workers=0,
    )
    metrics = ("precision_at_1", "precision_at_5", "precision_at_15", "mean_average_precision_at_r")
    tester = CrossDomainTester(PrecisionAtKCalculator(include=metrics), dataloader_num_workers=0)
    print(f"{args.backbone}, head at its PCA start:")
    before = score(tester, eval_images, trainer.key_encoder.module)
    trainer.train(num_epochs=args.epochs)
    print(f"{args.backbone}, after {args.epochs} epochs (momentum key encoder):")
    return trainer, before, score(tester, eval_images, trainer.key_encoder.module)


if __name__ == "__main__":
    main()
