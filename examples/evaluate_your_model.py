"""Score your own model on cross-domain retrieval with ``CrossDomainTester``.

Any ``nn.Module`` mapping a batch of images ``(B, 3, H, W)`` to embeddings ``(B, D)``
works: here a timm model (``--backbone``, optionally ``--weights FILE`` or
``--pretrained``) on the embedded demo set, or on your folder with ``--data DIR
--domains A B``. Every ordered domain pair is scored: the first domain's images query
the second's, a hit is an image of the same class; P@k is ProtoOT's micro precision.

Run::

    python examples/evaluate_your_model.py --backbone resnet18 --image-size 64
"""
import argparse

import timm
import torch

from pml_protoot import (
    CrossDomainTester,
    MultiDomainImageFolder,
    PrecisionAtKCalculator,
    create_trunk,
    eval_transform,
    fixed_input_size,
    make_synthetic_domains,
)


def load_eval_images(data, domains, image_size, mean, std):
    """``{domain: dataset of (image tensor, class label)}``: your folder, or the demo set."""
    transform = eval_transform(image_size, mean, std)
    if data is None:
        images = make_synthetic_domains(image_size=image_size, transform=transform)
    else:
        images = MultiDomainImageFolder(data, domains, transform=transform)
    return {domain: images.subset(domain) for domain in images.domains}


def evaluate(model: torch.nn.Module, dataset_dict: dict, k_values=(1, 5, 15)) -> dict:
    """Results ``{"A->B": {metric: value}, ..., "mean": {...}}`` of ``model`` on every domain pair."""
    metrics = [f"precision_at_{k}" for k in k_values] + ["mean_average_precision_at_r"]
    tester = CrossDomainTester(PrecisionAtKCalculator(k_values, include=metrics), dataloader_num_workers=0)
    results = tester.test(dataset_dict, epoch=0, trunk_model=model)
    print(tester.summary_table(results))
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18", help="any timm model name")
    parser.add_argument("--weights", help="local state dict of that model (offline tf_efficientnet_lite0 weights: "
                        "torch.save(pml_protoot.convert_efficientnet_lite0_weights(), FILE))")
    parser.add_argument("--pretrained", action="store_true", help="timm hub weights (needs internet)")
    parser.add_argument("--data", help="folder of <domain>/<class>/<image> (default: the demo set)")
    parser.add_argument("--domains", nargs="+", help="domain folders of --data (default: all)")
    parser.add_argument("--image-size", type=int, help="default: 64, or the size timm builds a ViT or Swin for")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.domains and args.data is None:
        parser.error("--domains picks folders of --data; the demo set takes no --domains")

    if not (args.pretrained or args.weights):
        print(f"note: {args.backbone} has random weights (no --pretrained or --weights): a baseline, not a model")
    torch.manual_seed(0)  # the random weights, when there are no others: the same numbers every run
    # Your model goes here: anything with forward(images) -> (B, D) embeddings.
    model, _ = create_trunk(args.backbone, pretrained=args.pretrained, weights=args.weights)
    model = model.to(args.device).eval()
    data_config = timm.data.resolve_data_config(model=model)
    # ViTs and Swin take only the size timm builds them for; 64 keeps other backbones quick on a CPU.
    size = args.image_size if args.image_size is not None else (fixed_input_size(args.backbone) or (64,))[0]
    dataset_dict = load_eval_images(args.data, args.domains, size, data_config["mean"], data_config["std"])
    return evaluate(model, dataset_dict)


if __name__ == "__main__":
    main()
