"""Multi-domain image datasets, two-view wrapping, the synthetic demo set, transforms and a feature cache.

Class labels are kept for evaluation only: :class:`TwoViewDataset` and
:meth:`FeatureCache.train_dataset` replace them by the global sample index, so
training code never sees them.
"""
from __future__ import annotations

import hashlib
import logging
import marshal
import math
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS

from ._checks import (
    as_index_tensor,
    check_bool,
    check_in_range,
    check_int,
    check_matrix,
    check_non_negative_int,
    check_per_channel,
    check_positive_int,
)
from ._files import atomic_write, check_creatable, load_saved
from ._progress import progress_bar
from ._tensors import at_least_float32, cast_floating, floating_dtype, model_device, sum_rows_by_group

__all__ = [
    "domain_means",
    "IMG_EXTENSIONS",
    "MultiDomainDataset",
    "MultiDomainImageFolder",
    "InMemoryMultiDomainDataset",
    "TwoViewDataset",
    "SYNTHETIC_SHAPES",
    "SYNTHETIC_STYLES",
    "make_synthetic_domains",
    "moco_v2_transform",
    "eval_transform",
    "trunk_features",
    "FeatureCache",
    "CachedTwoViewDataset",
]

logger = logging.getLogger(__name__)


class MultiDomainDataset(torch.utils.data.Dataset):
    """Images of several domains sharing one class list; item ``i`` is ``(image, class_label)``.

    Subclasses provide the samples and :meth:`load_image`. ``samples[i]`` is
    ``(path, class_label, domain_slot)``; ``domain_slot`` indexes :attr:`domains`.

    Attributes:
        domains: ``list[str]`` domain names (slot order).
        classes: ``list[str]`` sorted union of class names over domains.
        samples: ``list[(path, class_label, domain_slot)]``.
        domain_ids: ``(N,)`` LongTensor, the domain slot of every index (for
            :class:`~pml_protoot.samplers.CrossDomainSampler`).
        targets: ``list[int]`` class label of every index (evaluation only).

    Raises:
        ValueError: fewer than two domains, a domain or class name given twice, a sample's
            ``domain_slot`` outside ``[0, len(domains))``, or a domain without images. Class
            labels are not checked against ``classes`` (only a tester reads them; an unlabelled
            set may use -1).
        TypeError: a sample's ``domain_slot`` or ``class_label`` is not an integer.
    """

    def __init__(self, domains: list[str], classes: list[str], samples: list, transform: Callable | None):
        if len(domains) < 2:
            raise ValueError(f"domains must name at least two domains, got {domains}")
        self.domains = _check_distinct("domains", domains)
        self.classes = _check_distinct("classes", classes)
        self.class_to_idx = {name: label for label, name in enumerate(self.classes)}
        self.samples = list(samples)
        self.domain_ids = as_index_tensor("domain slots of samples (indices into domains)",
                                          [slot for _, _, slot in self.samples])
        check_in_range("domain slots of samples (indices into domains)", self.domain_ids, len(self.domains))
        # Integers, not checked against classes: only a tester reads them, and an unlabelled set may use -1.
        self.targets = as_index_tensor("class labels of samples", [label for _, label, _ in self.samples]).tolist()
        self.transform = transform
        for slot, name in enumerate(self.domains):
            if not bool((self.domain_ids == slot).any()):
                raise ValueError(f"domain {name!r} holds no images")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label, _ = self.samples[index]
        image = self.load_image(path)
        return (self.transform(image) if self.transform is not None else image), label

    def load_image(self, path: str) -> Image.Image:
        raise NotImplementedError

    def domain_indices(self, domain: str) -> torch.Tensor:
        """Return the ``(N_d,)`` global indices of ``domain``'s samples, in order."""
        if domain not in self.domains:
            raise ValueError(f"domain must be one of {self.domains}, got {domain!r}")
        return torch.nonzero(self.domain_ids == self.domains.index(domain)).flatten()

    def subset(self, domain: str) -> torch.utils.data.Subset:
        """Return the dataset of one domain (items ``(image, class_label)``), e.g. for a tester."""
        return torch.utils.data.Subset(self, self.domain_indices(domain).tolist())

    def fingerprint(self) -> str:
        """Return a hex digest identifying the image content (used by :class:`FeatureCache`)."""
        raise NotImplementedError


def _check_distinct(name: str, names) -> list:
    """``names`` as a list, raising if one occurs twice: a domain twice would retrieve its images from
    themselves, a class twice would hold every image twice."""
    names = list(names)
    repeated = sorted({repr(n) for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{name} must be distinct, got {names} ({', '.join(repeated)} more than once)")
    return names





class MultiDomainImageFolder(MultiDomainDataset):
    """Images in ``<root>/<domain>/<class>/<file>`` (Office-Home, DomainNet, PACS layouts).

    Classes are the sorted union of class folders over the chosen domains, so a label
    means the same class in every domain even where a domain lacks a class.

    Args:
        root: dataset folder.
        domains: domain folder names, in slot order; ``None`` takes every sub-folder
            of ``root``, sorted. Hidden folders and files (names starting with ``.``, such
            as ``.git`` or macOS's ``._photo.jpg``) are neither domains, classes nor images.
        transform: applied to each PIL image (RGB); ``None`` returns the image.
        extensions: a sequence of accepted file name endings (case-insensitive).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        TypeError: ``extensions`` is not a sequence of strings (a single string, None, a number among them).
        ValueError: a requested domain folder is missing (the available ones are
            listed), fewer than two domains, or a domain without images.
        OSError: on loading, an unreadable image (the message names the file).

    Example:
        >>> import tempfile
        >>> from pml_protoot.data import MultiDomainImageFolder, make_synthetic_domains
        >>> root = tempfile.mkdtemp()
        >>> _ = make_synthetic_domains(root, num_classes=2, images_per_class=2)
        >>> data = MultiDomainImageFolder(root)
        >>> data.domains, data.classes, len(data), data.domain_ids.tolist()
        (['filled', 'outline'], ['circle', 'triangle'], 8, [0, 0, 0, 0, 1, 1, 1, 1])
    """

    def __init__(self, root, domains: Sequence[str] | None = None, transform=None, extensions=IMG_EXTENSIONS):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"root must be a folder of <domain>/<class>/ images, {str(root)!r} is not one"
            )
        available = _visible_folders(self.root)
        if domains is None and len(available) < 2:
            raise ValueError(f"root {str(root)!r} must hold at least two domain folders "
                             f"(<root>/<domain>/<class>/<image>), got {available}")
        domains = available if domains is None else _check_domain_names(domains, available, self.root)
        extensions = _check_extensions(extensions)
        class_dirs = {d: _visible_folders(self.root / d) for d in domains}
        classes = sorted(set().union(*class_dirs.values()))
        samples = []
        for slot, domain in enumerate(domains):
            for name in class_dirs[domain]:
                folder = self.root / domain / name
                samples += [(str(folder / f), classes.index(name), slot) for f in _image_files(folder, extensions)]
        _check_no_images_above_classes(self.root, domains, samples, extensions)
        _check_every_class_has_images(self.root, classes, samples)
        super().__init__(list(domains), classes, samples, transform)
        logger.info(
            "MultiDomainImageFolder %s: %d images, domains %s, %d classes", root, len(self), domains, len(classes)
        )

    def load_image(self, path: str) -> Image.Image:
        try:
            with Image.open(path) as image:
                return _as_rgb(image)
        except (OSError, ValueError) as err:
            raise OSError(f"cannot read image file {path!r}: {err}") from err

    def fingerprint(self) -> str:
        """Digest of every file's path below ``root`` and bytes.

        Content, not modification times: a copied, moved or re-provisioned dataset keeps
        its feature cache (hashing 2,000 small JPEGs takes a fraction of a second).
        """
        digest = hashlib.sha256()
        for path, _, _ in self.samples:
            digest.update(f"{Path(path).relative_to(self.root).as_posix()}\0".encode())
            digest.update(Path(path).read_bytes())
        return digest.hexdigest()


def _check_extensions(extensions) -> tuple[str, ...]:
    """``extensions`` as a tuple of lower-case strings, or a TypeError naming what was given."""
    expected = "extensions must be a sequence of file name endings, e.g. ('.jpg', '.png')"
    if isinstance(extensions, str):
        raise TypeError(f"{expected}, got the string {extensions!r}")
    try:
        endings = tuple(extensions)
    except TypeError:
        raise TypeError(f"{expected}, got {type(extensions).__name__}") from None
    odd = [ending for ending in endings if not isinstance(ending, str)]
    if odd:
        raise TypeError(f"{expected}, got {type(odd[0]).__name__} {odd[0]!r} among them")
    return tuple(ending.lower() for ending in endings)


def _as_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. 16-bit grayscale (modes ``I;16*``, and ``I`` as Pillow opens 16-bit PNGs)
    is scaled to 8 bits: PIL's own conversion clips it at 255, which turns most such images white."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        levels = np.asarray(image, dtype=np.float64).clip(0, 65535) / 257
        image = Image.fromarray(levels.round().astype(np.uint8))  # mode L
    return image.convert("RGB")


def _visible_folders(folder: Path) -> list[str]:
    """Sorted sub-folder names, without hidden ones (``.git``, ``.ipynb_checkpoints``): never domains or classes."""
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _check_no_images_above_classes(root: Path, domains, samples, extensions) -> None:
    """Raise for a domain without images in class folders but with images directly inside it:
    the usual sign of a root one level too deep (``<root>/<class>/<image>``)."""
    filled = {slot for _, _, slot in samples}
    for slot, domain in enumerate(domains):
        if slot in filled:  # only an empty domain's folder is listed again
            continue
        loose = _image_files(root / domain, extensions)
        if loose:
            raise ValueError(
                f"domain {domain!r} holds {len(loose)} images directly but none in class folders: is root "
                f"{str(root)!r} one level too deep? Expected <root>/<domain>/<class>/<image>"
            )


def _check_every_class_has_images(root: Path, classes: list[str], samples) -> None:
    """Raise for a class folder with no image directly inside in any domain: it would count as a class
    (the default number of prototypes) with no sample; images in its sub-folders are not read."""
    empty = sorted(set(classes) - {classes[label] for _, label, _ in samples})
    if empty:
        raise ValueError(
            f"class folder(s) {empty} under {str(root)!r} hold no image directly inside in any domain (images in "
            "sub-folders are not read: <root>/<domain>/<class>/<image>); remove or fill them"
        )


def _image_files(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    """Sorted names of the visible files in ``folder`` ending (case-insensitively) in one of ``extensions``."""
    return sorted(
        entry.name for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(extensions)
    )


def _check_domain_names(domains, available, root) -> list[str]:
    if isinstance(domains, str) or not all(isinstance(d, str) for d in domains):
        raise TypeError(f"domains must be a list of folder names, got {domains!r}")
    missing = [d for d in domains if d not in available]
    if missing:
        raise ValueError(f"domains {missing} not found under {str(root)!r}; available domains: {available}")
    return _check_distinct("domains", domains)  # before scanning any folder


class InMemoryMultiDomainDataset(MultiDomainDataset):
    """A :class:`MultiDomainDataset` whose images live in memory (the synthetic demo set).

    Args:
        images: ``{(domain, class_name): [PIL images]}``.
        domains: domain names in slot order.
        classes: class names in label order.
        transform: applied to each image.

    Raises:
        TypeError: ``images`` is not a dict of ``(domain, class_name)`` keys and lists of PIL images.
        ValueError: a key of ``images`` names a domain or class not in ``domains``/``classes``, a
            domain or class name given twice, fewer than two domains, or a domain without images.

    Example:
        >>> from PIL import Image
        >>> from pml_protoot.data import InMemoryMultiDomainDataset
        >>> blank = Image.new("RGB", (8, 8))
        >>> images = {("a", "x"): [blank], ("b", "x"): [blank, blank]}
        >>> data = InMemoryMultiDomainDataset(images, ["a", "b"], ["x"])
        >>> len(data), data.domain_ids.tolist(), data[2][1]
        (3, [0, 1, 1], 0)
    """

    def __init__(self, images: dict, domains: Sequence[str], classes: Sequence[str], transform=None):
        _check_image_lists(images)
        unknown = sorted(set(images) - {(domain, name) for domain in domains for name in classes}, key=str)
        if unknown:
            raise ValueError(f"images has keys outside domains x classes, whose images would be dropped: {unknown[:5]} "
                             f"(domains {list(domains)}, classes {list(classes)})")
        self._images = {}
        samples = []
        for slot, domain in enumerate(domains):
            for label, name in enumerate(classes):
                for number, image in enumerate(images.get((domain, name), [])):
                    key = f"{domain}/{name}/{number:05d}.png"
                    self._images[key] = image
                    samples.append((key, label, slot))
        super().__init__(list(domains), list(classes), samples, transform)

    def load_image(self, path: str) -> Image.Image:
        return _as_rgb(self._images[path])  # a copy, read as MultiDomainImageFolder reads files

    def fingerprint(self) -> str:
        """Digest of every image's name, mode, size and RGB pixels as :meth:`load_image` gives them (a
        palette image's own bytes are palette indices; a 4 x 2 and a 2 x 4 image share bytes)."""
        digest = hashlib.sha256()
        for key, image in self._images.items():
            digest.update(f"{key}\0{image.mode}\0{image.size}".encode())
            digest.update(_as_rgb(image).tobytes())
        return digest.hexdigest()


def _check_image_lists(images) -> None:
    """Refuse ``images`` unless it is ``{(domain, class_name): [PIL images]}``."""
    expected = "images must be a dict {(domain, class_name): [PIL images]}"
    if not isinstance(images, dict):
        raise TypeError(f"{expected}, got a {type(images).__name__}")
    for key, value in images.items():
        if not isinstance(key, tuple) or len(key) != 2:
            raise TypeError(f"{expected}, got the key {key!r}")
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{expected}, got a {type(value).__name__} under {key!r}")
        for image in value:
            if not isinstance(image, Image.Image):
                raise TypeError(f"{expected}, got a {type(image).__name__} in the list under {key!r}")


class TwoViewDataset(torch.utils.data.Dataset):
    """Two augmented views of each image, labelled by index: item ``i`` is ``((query, key), i)``.

    The global index replaces the class label (it is what ProtoOT's loss and miner take
    as ``labels``), so training never reads class labels. ``domain_ids`` of the wrapped
    dataset, when present, is exposed for :class:`~pml_protoot.samplers.CrossDomainSampler`.

    Args:
        dataset: any dataset whose items are ``(image, label)`` (the label is dropped).
        query_transform: view for the query encoder.
        key_transform: view for the momentum key encoder.

    The views take the dataset's images as they come: build an image dataset with
    ``transform=None`` and put its transform into the views (e.g. :func:`moco_v2_transform`,
    which takes PIL images). Datasets of tensors with views that take tensors work as well.

    Raises:
        TypeError: a transform is not callable; on indexing, an item of ``dataset`` that is
            not an ``(image, class_label)`` tuple or list, or a view that fails (``TypeError``
            or ``AttributeError``) on an image that the dataset's own ``transform`` already
            turned into something other than a PIL image (a tensor): the message names that cause,
            the view's own error is chained.
        ValueError: on indexing, an item of ``dataset`` that is a tuple or list of other length.

    Example:
        >>> import torch
        >>> from pml_protoot.data import TwoViewDataset
        >>> base = torch.utils.data.TensorDataset(torch.arange(3.0), torch.tensor([7, 7, 9]))
        >>> TwoViewDataset(base, lambda x: x + 1, lambda x: x - 1)[2]
        ((tensor(3.), tensor(1.)), 2)
    """

    def __init__(self, dataset, query_transform: Callable, key_transform: Callable):
        if not callable(query_transform) or not callable(key_transform):
            raise TypeError("query_transform and key_transform must be callables (e.g. moco_v2_transform())")
        self.dataset = dataset
        self.query_transform = query_transform
        self.key_transform = key_transform
        if hasattr(dataset, "domain_ids"):
            self.domain_ids = dataset.domain_ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, _ = _image_and_label(self.dataset[index])
        try:
            return (self.query_transform(image), self.key_transform(image)), index
        except (TypeError, AttributeError) as err:
            # Only where the failure has this cause: a dataset's own transform ran before views expecting its raw
            # images (e.g. torchvision's "pic should be PIL Image or ndarray"); views on tensors are not refused.
            own_transform = _own_transform(self.dataset)
            if own_transform is None or isinstance(image, Image.Image):
                raise
            raise TypeError(
                f"query_transform and key_transform must take the dataset's images, but the dataset's own transform "
                f"({type(own_transform).__name__}) already made them a {type(image).__name__}, which a view refused "
                f"({type(err).__name__}: {err}); "
                f"{_TRANSFORM_INTO_VIEWS.format(views='query_transform and key_transform')}"
            ) from err


#: The fix for a dataset whose own transform runs before views that expect its raw images.
_TRANSFORM_INTO_VIEWS = "build the dataset with transform=None and put its transform into {views}"


def _own_transform(dataset):
    """The ``transform`` of ``dataset``, or of the dataset below its ``Subset`` wrappers; None when it has none."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return getattr(dataset, "transform", None)


def _image_and_label(item, argument: str = "dataset items") -> tuple:
    """``item`` if it is an ``(image, class_label)`` pair; a bare tensor of two rows would unpack silently.
    ``argument`` names the items in the message."""
    if not isinstance(item, (tuple, list)):
        raise TypeError(f"{argument} must be (image, class_label) tuples, got a {type(item).__name__}")
    if len(item) != 2:
        raise ValueError(f"{argument} must be (image, class_label) tuples, got a {type(item).__name__} "
                         f"of length {len(item)}")
    return item


def first_item(dataset, num_workers: int = 0):
    """``dataset[0]``, read to check the items' layout before any work, as a ``DataLoader`` with
    ``num_workers`` would read it, and without moving what training then draws.

    With ``num_workers > 0`` the item is read in a worker process: a dataset that opens files lazily
    (h5py, LMDB) keeps no handle here for later workers to inherit, and whatever random state the read
    moves stays in that process. With 0 it is read here, and torch's generators (CPU, and CUDA once
    initialised), Python's and NumPy's, and the state of the dataset and of the datasets it wraps
    (``.dataset``, ``.datasets``) that have ``state_dict``/``load_state_dict`` are put back; a generator a
    transform holds of its own is not.

    Returns:
        The item, or None for an empty dataset or one that cannot be indexed (an ``IterableDataset``).
    """
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        return None
    if not hasattr(dataset, "__len__") or len(dataset) == 0:
        return None
    saved = [(part, part.state_dict()) for part in _stateful_datasets(dataset)] if num_workers == 0 else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):  # a loader draws its workers' seed here too
            if num_workers == 0:
                return dataset[0]
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=[0], num_workers=1,
                                                 collate_fn=_as_is)
            return next(iter(loader))
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for part, state in saved:
            part.load_state_dict(state)


def _as_is(item):
    """A ``collate_fn`` that leaves an item as the dataset made it (module level: workers may pickle it)."""
    return item


def _stateful_datasets(dataset) -> list:
    """``dataset`` and the datasets it wraps (``.dataset``, ``.datasets``) that have a state to restore."""
    found, pending = [], [dataset]
    while pending:
        part = pending.pop()
        if callable(getattr(part, "state_dict", None)) and callable(getattr(part, "load_state_dict", None)):
            found.append(part)
        inner = [getattr(part, "dataset", None), *(getattr(part, "datasets", None) or [])]
        pending += [candidate for candidate in inner if isinstance(candidate, torch.utils.data.Dataset)]
    return found


def item_layout(item) -> str:
    """A dataset item's layout for error messages, e.g. ``"(Image, int)"`` or ``"((Tensor, Tensor), int)"``."""
    if isinstance(item, (tuple, list)):
        return "(" + ", ".join(item_layout(field) for field in item) + ")"
    return type(item).__name__


def check_no_pil_images(argument: str, item, remedy: str = "build the dataset with transform=eval_transform(...)"
                        ) -> None:
    """Refuse an item that is a PIL image or starts with one: torch's default collate cannot batch it (a
    dataset built without its evaluation transform, by default ``remedy``)."""
    first = item[0] if isinstance(item, (tuple, list)) and item else item
    if isinstance(first, Image.Image):
        raise TypeError(f"{argument} hold PIL images, which torch's default collate cannot batch: the images must "
                        f"be tensors; {remedy}")


# ---------------------------------------------------------------- synthetic demo set

SYNTHETIC_SHAPES = ("circle", "triangle", "square", "star", "cross", "moon")
SYNTHETIC_STYLES = ("filled", "outline", "dots")
SYNTHETIC_MIN_IMAGE_SIZE = 16  # no smaller image holds a recognisable shape


def _ring(n: int, radius: float = 1.0, start: float = 0.0) -> np.ndarray:
    """Return ``n`` evenly spaced ``(n, 2)`` points on a circle, the first at angle ``start``."""
    angles = start + np.linspace(0, 2 * np.pi, n, endpoint=False)
    return radius * np.stack([np.cos(angles), np.sin(angles)], 1)


def _shape_outline(shape: str) -> np.ndarray:
    """Return the ``(P, 2)`` closed outline of ``shape`` in unit coordinates (radius about 1)."""
    if shape == "circle":
        return _ring(40)
    if shape == "triangle":
        return _ring(3, start=-np.pi / 2)
    if shape == "square":
        return _ring(4, start=np.pi / 4)
    if shape == "star":
        points = _ring(10, start=-np.pi / 2)
        points[1::2] *= 0.4
        return points
    if shape == "cross":
        a, b = 0.33, 1.0
        quarter = np.array([[-a, -b], [a, -b], [a, -a]])  # one arm; the others by 90-degree turns
        turn = np.array([[0.0, -1.0], [1.0, 0.0]])
        return np.concatenate([quarter @ np.linalg.matrix_power(turn, k).T for k in range(4)])
    # moon: outer arc of the unit circle, back along an inner arc of an offset circle.
    outer = _ring(24, start=np.pi / 2)[:13]
    inner = 0.4 * np.array([1.0, 0.0]) + _ring(24, radius=0.9, start=np.pi / 2)[:13][::-1] * [0.75, 1.0]
    return np.concatenate([outer, inner])


def _draw_synthetic(shape: str, style: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one ``shape`` in ``style`` with random position, scale, rotation and colour."""
    radius = rng.uniform(0.22, 0.38) * size
    centre = rng.uniform(radius, size - radius, 2)
    theta = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    points = [tuple(p) for p in _shape_outline(shape) @ rotation.T * radius + centre]
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if style == "filled":
        noise = rng.integers(0, 256, (size, size, 3)) * 0.35 + rng.integers(100, 256, 3) * 0.65
        image = Image.fromarray(noise.astype(np.uint8))
        ImageDraw.Draw(image).polygon(points, fill=colour)
        return image
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    ink = tuple(int(c) for c in rng.integers(0, 80, 3))
    if style == "outline":
        draw.line(points + points[:1], fill=ink, width=max(1, size // 32), joint="curve")
        return image
    dot = max(1.0, size / 40)
    for x, y in _resample_closed(np.array(points), spacing=3 * dot):
        draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=ink)
    return image


def _resample_closed(points: np.ndarray, spacing: float) -> np.ndarray:
    """Return points every ``spacing`` pixels along the closed polygon ``points`` (P, 2)."""
    closed = np.concatenate([points, points[:1]])
    lengths = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    cumulative = np.concatenate([[0.0], np.cumsum(lengths)])
    distances = np.arange(0.0, cumulative[-1], spacing)
    return np.stack([np.interp(distances, cumulative, closed[:, axis]) for axis in (0, 1)], 1)


def _class_counts(images_per_class, num_classes: int, slot: int) -> list[int]:
    """Per-class counts of domain ``slot``: linear from most to fewest, rotated by ``slot``."""
    if not isinstance(images_per_class, (tuple, list)):
        return [check_positive_int("images_per_class", images_per_class)] * num_classes
    if len(images_per_class) != 2:
        raise ValueError(f"images_per_class must be an int or (most, fewest), got {images_per_class!r}")
    most, fewest = images_per_class
    check_positive_int("images_per_class[0]", most)
    check_positive_int("images_per_class[1]", fewest)
    counts = np.linspace(most, fewest, num_classes).round().astype(int).tolist()
    shift = slot % num_classes
    return counts[shift:] + counts[:shift]


def make_synthetic_domains(
    root=None,
    *,
    num_classes: int = 5,
    images_per_class=(40, 20),
    domains: Sequence[str] = ("filled", "outline"),
    image_size: int = 64,
    seed: int = 0,
    transform=None,
) -> MultiDomainDataset:
    """Draw the embedded demo set: shape classes in visually different domains, no download.

    Classes are :data:`pml_protoot.data.SYNTHETIC_SHAPES` (circle, triangle, square, star, cross,
    moon); domains are drawing styles from :data:`pml_protoot.data.SYNTHETIC_STYLES`: ``"filled"``
    (solid colour shape on a noisy tinted background), ``"outline"`` (dark line drawing on white),
    ``"dots"`` (dotted outline on white). Every image has a random position, size,
    rotation and colour. Class counts differ per domain: with ``(most, fewest)``, counts
    fall linearly from ``most`` to ``fewest`` over the classes, and domain ``d`` rotates
    that order by ``d`` places, so each domain has a different imbalance.

    Args:
        root: ``None`` keeps the images in memory; a new or empty folder gets
            ``<root>/<domain>/<class>/<n>.png`` files (the :class:`MultiDomainImageFolder`
            layout) and the returned dataset reads them back from disk, its classes in
            alphabetical order as with any folder (in memory they follow
            :data:`pml_protoot.data.SYNTHETIC_SHAPES`).
        num_classes: first ``num_classes`` shapes, 1 to ``len(SYNTHETIC_SHAPES)``.
        images_per_class: an int (balanced) or ``(most, fewest)``.
        domains: two or more distinct names from :data:`SYNTHETIC_STYLES`.
        image_size: square image side in pixels (>= 16).
        seed: the same seed gives the same images.
        transform: passed to the dataset.

    Returns:
        :class:`InMemoryMultiDomainDataset` (``root=None``) or :class:`MultiDomainImageFolder`.

    Raises:
        TypeError: ``num_classes``, ``images_per_class``, ``image_size`` or ``seed`` not an integer.
        ValueError: bad ``num_classes``, ``images_per_class``, ``domains``, ``image_size`` or ``seed``, a
            ``root`` that already holds files (they would join the returned dataset), or a ``root``
            that is a file.

    Example:
        >>> from pml_protoot.data import make_synthetic_domains
        >>> data = make_synthetic_domains(num_classes=3, images_per_class=(4, 2))
        >>> data.classes, [len(data.subset(d)) for d in data.domains]
        (['circle', 'triangle', 'square'], [9, 9])
        >>> data[0][0].size
        (64, 64)
    """
    num_classes = check_int("num_classes", num_classes, low=1, high=len(SYNTHETIC_SHAPES))
    domains = list(domains)
    unknown = [d for d in domains if d not in SYNTHETIC_STYLES]
    if unknown or len(set(domains)) != len(domains) or len(domains) < 2:
        raise ValueError(f"domains must be two or more distinct names from {SYNTHETIC_STYLES}, got {domains}")
    image_size = check_int("image_size", image_size, low=SYNTHETIC_MIN_IMAGE_SIZE)
    seed = check_non_negative_int("seed", seed)
    if root is not None and Path(root).is_dir() and any(Path(root).iterdir()):
        raise ValueError(f"root must be a new or empty folder, {str(root)!r} already holds files")
    if root is not None and Path(root).exists() and not Path(root).is_dir():
        raise ValueError(f"root must be a new or empty folder, {str(root)!r} is a file")
    classes = list(SYNTHETIC_SHAPES[:num_classes])
    images = {}
    for slot, domain in enumerate(domains):
        rng = np.random.default_rng([seed, slot])
        for name, count in zip(classes, _class_counts(images_per_class, num_classes, slot)):
            images[domain, name] = [_draw_synthetic(name, domain, image_size, rng) for _ in range(count)]
    if root is None:
        return InMemoryMultiDomainDataset(images, domains, classes, transform)
    for (domain, name), drawn in images.items():
        folder = Path(root) / domain / name
        folder.mkdir(parents=True, exist_ok=True)
        for number, image in enumerate(drawn):
            image.save(folder / f"{number:05d}.png")
    return MultiDomainImageFolder(root, domains, transform)


# ---------------------------------------------------------------- transforms


#: MoCo-v2's augmentation parameters, shared by :func:`moco_v2_transform` and
#: :class:`~pml_protoot.augment.MoCoV2Augment`.
MOCO_V2 = {
    "crop_scale": (0.2, 1.0),
    "jitter": (0.4, 0.4, 0.4, 0.1),  # brightness, contrast, saturation, hue
    "jitter_p": 0.8,
    "grayscale_p": 0.2,
    "blur_p": 0.5,
    "blur_sigma": (0.1, 2.0),
}


def blur_kernel_size(image_size: int) -> int:
    """MoCo-v2's Gaussian blur kernel: about a tenth of the image side, odd."""
    return 2 * (image_size // 20) + 1


def moco_v2_transform(
    image_size: int = 224, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
) -> T.Compose:
    """MoCo-v2 augmentation as ProtoOT trains with it (PIL image -> ``(3, S, S)`` tensor).

    RandomResizedCrop(scale 0.2-1), colour jitter 0.4/0.4/0.4/0.1 with p=0.8, grayscale
    p=0.2, Gaussian blur (sigma 0.1-2) with p=0.5, horizontal flip, then normalisation.
    :class:`~pml_protoot.augment.MoCoV2Augment` is the same on whole batches on a GPU.

    Args:
        image_size: output side ``S``.
        mean, std: per-channel normalisation. ImageNet's by default, which most timm weights
            expect; take your trunk's from ``timm.data.resolve_data_config(model=trunk)``
            (``tf_efficientnet_lite0``, for one, wants 0.5/0.5). Three numbers or one for all.

    Raises:
        TypeError: ``image_size`` not an integer, ``mean``/``std`` not numbers.
        ValueError: ``image_size < 1``; ``mean``/``std`` not 1 or 3 finite values, a value above 1
            (0-255 statistics), or a ``std`` <= 0.

    Example:
        >>> from PIL import Image
        >>> from pml_protoot.data import moco_v2_transform
        >>> moco_v2_transform(32)(Image.new("RGB", (48, 40))).shape
        torch.Size([3, 32, 32])
    """
    check_positive_int("image_size", image_size)
    _check_normalisation(mean, std)
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=MOCO_V2["crop_scale"]),
        T.RandomApply([T.ColorJitter(*MOCO_V2["jitter"])], p=MOCO_V2["jitter_p"]),
        T.RandomGrayscale(p=MOCO_V2["grayscale_p"]),
        T.RandomApply([T.GaussianBlur(blur_kernel_size(image_size), sigma=MOCO_V2["blur_sigma"])], p=MOCO_V2["blur_p"]),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def _check_normalisation(mean, std) -> None:
    """Refuse what ``T.Normalize`` takes silently (NaN, 0-255 statistics) or refuses only at the first
    image (a zero std).
    The values go to it as given: their repr is part of a feature cache's key."""
    check_per_channel("mean", mean)
    check_per_channel("std", std, positive=True)


def eval_resize_side(image_size: int) -> int:
    """Shorter side the eval view resizes to before its centre crop of ``image_size``: 256 for 224."""
    return math.floor(image_size * 256 / 224)


def eval_transform(image_size: int = 224, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> T.Compose:
    """Evaluation view: Resize(S * 256/224), CenterCrop(S), normalisation (Resize 256, crop 224 at S=224).

    Args:
        image_size: output side ``S``.
        mean, std: per-channel normalisation, as for :func:`moco_v2_transform`.

    Raises:
        TypeError, ValueError: as :func:`moco_v2_transform`.

    Example:
        >>> from PIL import Image
        >>> from pml_protoot.data import eval_transform
        >>> eval_transform(32)(Image.new("RGB", (48, 40))).shape
        torch.Size([3, 32, 32])
    """
    check_positive_int("image_size", image_size)
    _check_normalisation(mean, std)
    return T.Compose([
        T.Resize(eval_resize_side(image_size)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


# ---------------------------------------------------------------- feature cache


@torch.no_grad()
def trunk_features(
    trunk: torch.nn.Module,
    dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    description: str = "trunk features",
) -> torch.Tensor:
    r"""``(N, F)`` outputs ``trunk(x)`` of every item of ``dataset``, in order, on the CPU.

    What :func:`~pml_protoot.backbones.pca_init_` starts a head from, and what
    :class:`FeatureCache` stores. Floating inputs go to the trunk's device (that of its first
    parameter; the CPU for a parameter-free trunk) and to the dtype its floating parameters share
    (kept as they are when they share none), as in :class:`~pml_protoot.testers.CrossDomainTester`.
    The trunk runs in eval mode (batch-norm running statistics, no dropout) under ``torch.no_grad()``; its
    train/eval mode is restored afterwards. Half-precision outputs (e.g. under autocast) are returned as
    float32; float32 and float64 outputs keep their dtype.

    Args:
        trunk: ``(B, *input_shape) -> (B, F)``, e.g. from :func:`~pml_protoot.backbones.create_trunk`.
        dataset: items ``x`` or tuples ``(x, ...)`` (e.g. ``(image, class_label)``); only ``x`` is used.
        batch_size: items per trunk call.
        num_workers: ``DataLoader`` worker processes (image decoding and transforms).
        progress: show a tqdm progress bar (where stderr is a terminal; an INFO log line says the
            size and time in any case).
        description: the progress bar's and the log line's label.

    Returns:
        ``(N, F)`` CPU tensor, row ``i`` from ``dataset[i]``.

    Raises:
        TypeError: ``trunk`` is not a ``torch.nn.Module`` or returns no tensor (a tuple), ``batch_size`` /
            ``num_workers`` not an integer, or items that are (or start with) PIL images.
        ValueError: ``dataset`` is empty, ``batch_size < 1`` / ``num_workers < 0``, or the trunk's output is
            not ``(B, F)`` (a trunk without global pooling).

    Example:
        >>> import torch
        >>> from pml_protoot.data import trunk_features
        >>> dataset = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.arange(10))
        >>> trunk = torch.nn.Linear(3, 4)
        >>> features = trunk_features(trunk, dataset, batch_size=4)
        >>> features.shape, torch.allclose(features, trunk(dataset.tensors[0]))
        (torch.Size([10, 4]), True)
    """
    if not isinstance(trunk, torch.nn.Module):
        raise TypeError(f"trunk must be a torch.nn.Module, got {type(trunk).__name__}")
    check_positive_int("batch_size", batch_size)
    check_non_negative_int("num_workers", num_workers)
    if len(dataset) == 0:
        raise ValueError("dataset is empty: there is nothing to extract features from")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_collate_tensors)
    device = model_device(trunk)
    batches = progress_bar(loader, description, show=progress)
    start = time.perf_counter()
    modes = [(module, module.training) for module in trunk.modules()]  # per module: modes may be mixed
    trunk.eval()
    try:
        dtype = floating_dtype(trunk)
        outputs = [at_least_float32(_check_features(trunk(cast_floating(_inputs(batch).to(device), dtype)))).cpu()
                   for batch in batches]
    finally:
        for module, training in modes:
            module.training = training
    logger.info("%s: %d items in %.1f s", description, len(dataset), time.perf_counter() - start)
    return torch.cat(outputs)


def _check_features(output):
    """``output`` of a trunk call, if it is ``(B, F)`` features; else a TypeError or ValueError saying what it was."""
    remedy = "a headless timm model with global pooling, as create_trunk builds, gives them"
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"trunk must return a (B, F) tensor of features ({remedy}), got a {type(output).__name__}")
    if output.dim() != 2:
        raise ValueError(f"trunk must return (B, F) features ({remedy}), got shape {tuple(output.shape)}")
    return output


def _collate_tensors(items: list):
    """torch's default collate, refusing PIL images in words that say what to do (torch's own do not)."""
    check_no_pil_images("dataset items", items[0])
    return torch.utils.data.default_collate(items)


def _inputs(batch):
    """The model inputs of a collated batch: the batch itself, or its first field for ``(x, ...)`` items."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


#: What a FeatureCache file holds: its inputs' digest, eval-view and augmented-view features.
CACHE_ENTRIES = frozenset({"key", "eval", "views"})


class FeatureCache:
    r"""Frozen-trunk features of every image, for the eval view and ``V`` augmented views, computed once.

    Training a head on cached trunk features turns hours of CPU feature extraction per
    epoch into one pass. Features are extracted in batches with ``torch.no_grad()`` and
    the trunk in eval mode (its mode is restored), under a forked RNG (the augmented views
    seeded by ``seed``): computed or loaded, the cache leaves the global random state alone.
    With ``path``, the cache is saved as a ``.pt`` file and reused while its key matches:
    the dataset's :meth:`~MultiDomainDataset.fingerprint` (relative file paths and bytes),
    both transforms' ``repr`` and the function of each ``T.Lambda`` step in them (name, code,
    defaults and captured values: its repr shows none), a digest of the trunk's ``state_dict``,
    ``num_views`` and ``seed``; any change recomputes it. A transform of your own whose repr
    hides a setting should show it (``__repr__``), or the cache may come back stale.

    Args:
        dataset: a :class:`MultiDomainDataset` returning PIL images (``transform=None``).
        trunk: the frozen feature extractor, ``(B, 3, H, W) -> (B, F)``.
        train_view: augmentation for the cached training views (e.g. :func:`moco_v2_transform`).
        eval_view: deterministic evaluation transform (e.g. :func:`eval_transform`).
        num_views: ``V >= 2`` augmented views per image.
        path: ``.pt`` cache file, or ``None`` for memory only. A cache of other data, trunk,
            views or seed there is recomputed and replaced; any other file is refused, never
            overwritten. A path that cannot be written is refused before the extraction.
        batch_size: images per trunk call.
        device: where the trunk runs: it is moved there (``None``: where it is).
        seed: seed of the augmentations.
        num_workers: ``DataLoader`` workers for image decoding. Workers draw the augmented views
            from their own seeds: the views then depend on ``num_workers`` and ``batch_size``
            too, and the cache key covers both (with 0 workers they do not).
        progress: show tqdm progress bars.
        center_domains: subtract each domain's mean eval-view feature :math:`\mu_d` from
            every feature of that domain (all views) in :meth:`train_dataset` and
            :meth:`eval_dataset`. Domains are known in unsupervised cross-domain
            retrieval, at training and at test time; removing the per-domain offset of a
            frozen trunk's features is what lets prototypes of different domains line up
            (on pacs-mini it alone lifts raw cross-domain P@15 from 43.5 to 47.4, and it is
            part of the package's default pipeline: see the accuracy benchmark).

    Attributes:
        eval_features: ``(N, F)`` float32 CPU tensor (as extracted, never centred).
        view_features: ``(V, N, F)`` float32 CPU tensor (as extracted, never centred).
        domain_means: ``(D, F)`` mean eval-view feature of each domain slot.

    Raises:
        TypeError: ``dataset`` is not a :class:`MultiDomainDataset`, ``trunk`` not a
            ``torch.nn.Module``, ``train_view`` or ``eval_view`` not callable, ``center_domains``
            not True or False, or ``num_views``, ``batch_size``, ``seed`` or ``num_workers`` not
            an integer.
        ValueError: ``dataset.transform`` is set (the key does not cover it), ``num_views < 2``, ``batch_size < 1``,
            ``seed < 0``, ``num_workers < 0``, or a ``path`` that is a folder or a file other
            than a feature cache. All are checked before any hashing or extraction.

    Example:
        >>> import torch
        >>> from pml_protoot.data import FeatureCache, make_synthetic_domains
        >>> from pml_protoot.data import eval_transform, moco_v2_transform
        >>> data = make_synthetic_domains(num_classes=2, images_per_class=2, image_size=16)
        >>> trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
        >>> cache = FeatureCache(data, trunk, train_view=moco_v2_transform(16), eval_view=eval_transform(16),
        ...                      num_views=2, progress=False)
        >>> (views_a, views_b), index = cache.train_dataset()[5]
        >>> views_a.shape, index, cache.view_features.shape
        (torch.Size([4]), 5, torch.Size([2, 8, 4]))
        >>> features, label = cache.eval_dataset("outline")[0]
        >>> int(label) == data.targets[int(data.domain_indices("outline")[0])]
        True
    """

    def __init__(
        self,
        dataset,
        trunk: torch.nn.Module,
        *,
        train_view: Callable,
        eval_view: Callable,
        num_views: int = 4,
        path=None,
        batch_size: int = 64,
        device=None,
        seed: int = 0,
        num_workers: int = 0,
        progress: bool = True,
        center_domains: bool = False,
    ):
        _check_cache_inputs(dataset, trunk, train_view, eval_view)
        num_views = check_int("num_views", num_views, low=2)  # two views a training sample
        self.dataset = dataset
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.num_workers = check_non_negative_int("num_workers", num_workers)
        self.progress = bool(progress)
        self.seed = check_non_negative_int("seed", seed)
        self.center_domains = check_bool("center_domains", center_domains)
        # Workers draw the augmented views from per-worker seeds, so the views then also depend on how
        # many there are and on which batches each takes; in the main process they do not.
        loading = [f"num_workers={num_workers}, batch_size={batch_size}"] if num_workers else []
        self.path = None if path is None else Path(path)
        stored = self._stored()  # before hashing, which reads every image: minutes on a large dataset
        self.key = _digest([
            dataset.fingerprint(), _transform_key(eval_view), _transform_key(train_view), repr(trunk),
            _weights_digest(trunk),
            str(num_views), str(seed), *loading,
        ])
        if stored is not None and stored["key"] == self.key:
            self.eval_features, self.view_features = stored["eval"], stored["views"]
            logger.info("loaded cached features from %s", self.path)
        else:
            stale, stored = stored is not None, None  # freed before the extraction that replaces it
            if stale:  # a stale cache is replaced: its folder must be writable
                logger.info("feature cache %s is stale (data, transforms, weights or views changed)", self.path)
                check_creatable("feature cache path", self.path, folder=False)
            self._compute(trunk if device is None else trunk.to(device), train_view, eval_view, num_views)
            self._save()
        self.domain_means = domain_means(self.eval_features, dataset.domain_ids)

    def _stored(self) -> dict | None:
        """The cache stored at ``path``, or None when there is none yet (``path`` then checked
        creatable, before the extraction whose result it is to receive)."""
        if self.path is None:
            return None
        if not self.path.exists():
            check_creatable("feature cache path", self.path, folder=False)
            return None
        if not self.path.is_file():
            raise ValueError(f"feature cache path {str(self.path)!r} must name a file, got a folder")
        stored = load_saved(self.path, "feature cache path")
        if not (isinstance(stored, dict) and CACHE_ENTRIES <= set(stored)):
            raise ValueError(
                f"feature cache path {str(self.path)!r} holds something other than a feature cache (no {sorted(CACHE_ENTRIES)} "
                "entries): it is not overwritten; give the cache a file name of its own"
            )
        return stored

    def _save(self) -> None:
        if self.path is None:
            return
        with atomic_write(self.path) as file:  # never leave a half-written cache behind
            torch.save({"key": self.key, "eval": self.eval_features, "views": self.view_features}, file)
        logger.info("saved feature cache to %s", self.path)

    def _compute(self, trunk, train_view, eval_view, num_views) -> None:
        # Under the fork, the eval view too: its loader draws a seed from the global generator, which a cache
        # loaded from its file would leave alone (runs then differed by whether the file existed).
        with torch.random.fork_rng(devices=[]):
            self.eval_features = self._extract(trunk, eval_view, "eval view")
            torch.manual_seed(self.seed)
            # filled view by view: stacking a list would hold every view twice
            self.view_features = self.eval_features.new_empty((num_views, *self.eval_features.shape))
            for v in range(num_views):
                self.view_features[v] = self._extract(trunk, train_view, f"augmented view {v + 1}/{num_views}")

    def _extract(self, trunk, transform, description) -> torch.Tensor:
        features = trunk_features(
            trunk, _Transformed(self.dataset, transform), batch_size=self.batch_size,
            num_workers=self.num_workers, progress=self.progress, description=description,
        )
        return features.float()  # the cache's documented dtype, whatever the trunk's

    def train_dataset(self, seed: int = 0) -> "CachedTwoViewDataset":
        """Label-free training set: item ``i`` is ``((view_a, view_b), i)``, two distinct cached views."""
        offsets = self.domain_means if self.center_domains else None  # centred as drawn: no copy of every view
        return CachedTwoViewDataset(self.view_features, self.dataset.domain_ids, seed=seed, domain_offsets=offsets)

    def eval_dataset(self, domain: str) -> torch.utils.data.TensorDataset:
        """Items ``(eval_feature (F,), class_label)`` of one domain, for a tester."""
        indices = self.dataset.domain_indices(domain)
        labels = torch.tensor(self.dataset.targets, dtype=torch.long)[indices]
        features = self.eval_features[indices]
        if self.center_domains:
            features = features - self.domain_means[self.dataset.domains.index(domain)]
        return torch.utils.data.TensorDataset(features, labels)


def _transform_key(transform) -> str:
    """``repr(transform)`` and what it hides: the function of each ``T.Lambda`` step (whose repr is
    ``Lambda()`` whatever it does), by name, code and captured values. Without Lambda steps, the repr alone."""
    hidden = [_function_identity(step.lambd) for step in _steps(transform) if isinstance(step, T.Lambda)]
    return "\0".join([repr(transform), *hidden])


def _steps(transform):
    """``transform`` and, depth first, the steps of the compositions in it (``Compose``, ``RandomApply``, ...)."""
    yield transform
    for step in getattr(transform, "transforms", None) or ():
        yield from _steps(step)


def _function_identity(function) -> str:
    """A plain function by module, name, a digest of its code, its defaults and closure values; anything
    else (a partial, a callable object, a builtin) by its repr."""
    code = getattr(function, "__code__", None)
    if code is None:
        return repr(function)
    captured = [cell.cell_contents for cell in function.__closure__ or ()]
    return (f"{function.__module__}.{function.__qualname__} {hashlib.sha256(marshal.dumps(code)).hexdigest()} "
            f"{function.__defaults__!r} {captured!r}")


def _check_cache_inputs(dataset, trunk, train_view, eval_view) -> None:
    """Refuse what :class:`FeatureCache` would otherwise trip over after hashing or extracting."""
    if not isinstance(dataset, MultiDomainDataset):
        raise TypeError(
            f"dataset must be a MultiDomainDataset (e.g. MultiDomainImageFolder), got {type(dataset).__name__}"
        )
    if dataset.transform is not None:  # the views are applied to the dataset's PIL images
        raise ValueError(f"dataset.transform must be None: the cache applies train_view and eval_view to the "
                         f"dataset's images itself, and its key does not cover a transform of the dataset; got "
                         f"{type(dataset.transform).__name__}: "
                         f"{_TRANSFORM_INTO_VIEWS.format(views='train_view and eval_view')}")
    if not isinstance(trunk, torch.nn.Module):
        raise TypeError(f"trunk must be a torch.nn.Module, got {type(trunk).__name__}")
    for name, view in (("train_view", train_view), ("eval_view", eval_view)):
        if not callable(view):
            raise TypeError(f"{name} must be a callable transform (e.g. moco_v2_transform(), eval_transform()), "
                            f"got {type(view).__name__}")


def domain_means(features: torch.Tensor, domain_ids: torch.Tensor) -> torch.Tensor:
    r"""Mean feature of every domain slot: :math:`\mu_d = \frac{1}{N_d}\sum_{i: d_i = d} x_i`.

    Subtract ``domain_means(x, d)[d]`` from ``x`` to centre each domain (see
    ``FeatureCache(center_domains=True)``).

    Args:
        features: ``(N, F)`` features.
        domain_ids: ``(N,)`` domain slot ``0..D-1`` of every row; every slot must occur.

    Returns:
        ``(D, F)`` means, in the dtype of ``features`` (computed in float32 at least).

    Raises:
        TypeError: ``features`` not a floating-point tensor, or ``domain_ids`` not 1-D integers.
        ValueError: ``features`` not ``(N, F)`` or not finite, or ``domain_ids`` not of length ``N``,
            negative, or leaving a slot ``0..max(domain_ids)`` without rows.

    Example:
        >>> import torch
        >>> domain_means(torch.tensor([[0.0, 2.0], [2.0, 2.0], [5.0, 1.0]]), torch.tensor([0, 0, 1]))
        tensor([[1., 2.],
                [5., 1.]])
    """
    check_matrix("features", features)
    domain_ids = as_index_tensor("domain_ids", domain_ids, device=features.device)
    if domain_ids.numel() != features.shape[0]:
        raise ValueError(f"domain_ids must have one entry per row of features ({features.shape[0]}), "
                         f"got {domain_ids.numel()}")
    if bool((domain_ids < 0).any()):
        raise ValueError(f"domain_ids must be domain slots >= 0, got {domain_ids[domain_ids < 0][:5].tolist()}")
    counts = torch.bincount(domain_ids)
    if (counts == 0).any():
        raise ValueError(f"domain_ids must use every slot 0..{len(counts) - 1}; empty: "
                         f"{torch.nonzero(counts == 0).flatten().tolist()}")
    # Summed and divided in float32 at least: a float16 sum (and count) overflows past 65,504.
    sums = sum_rows_by_group(at_least_float32(features), domain_ids, len(counts))
    return (sums / counts[:, None].to(sums.dtype)).to(features.dtype)


class CachedTwoViewDataset(torch.utils.data.Dataset):
    """Item ``i`` is ``((views[a, i], views[b, i]), i)`` with ``a != b`` drawn afresh on each call.

    The draw uses the dataset's own generator in the main process (its state is in
    :meth:`state_dict`, which ``ProtoOTTrainer`` checkpoints) and torch's generator in a
    DataLoader worker, which the DataLoader seeds per worker and per epoch.

    Args:
        views: ``(V, N, F)`` cached features, ``V >= 2``.
        domain_ids: ``(N,)`` domain slot of every index (for the sampler).
        seed: seed of the view choice, an integer >= 0.
        domain_offsets: ``(D, F)``, subtracted from both views of a sample of domain ``d`` (row ``d``) as
            they are drawn: :class:`FeatureCache`'s domain centring without a centred copy of ``views``
            (on a DomainNet-sized cache, many GB); ``None`` (default) leaves the views as they are.

    Raises:
        TypeError: ``views`` or ``domain_offsets`` not a tensor, ``domain_ids`` not integer indices, or
            ``seed`` not an integer.
        ValueError: ``views`` not ``(V >= 2, N, F)``, ``domain_ids`` not of length ``N``, ``seed < 0``, or
            ``domain_offsets`` without a row for every domain slot or of another width than ``F``.
    """

    def __init__(self, views: torch.Tensor, domain_ids: torch.Tensor, seed: int = 0,
                 domain_offsets: torch.Tensor | None = None):
        if not isinstance(views, torch.Tensor):
            raise TypeError(f"views must be a (V, N, F) tensor with V >= 2 views, got {type(views).__name__}")
        if views.dim() != 3 or views.shape[0] < 2:
            raise ValueError(f"views must be a (V, N, F) tensor with V >= 2 views, got {tuple(views.shape)}")
        self.views = views
        self.domain_ids = as_index_tensor("domain_ids", domain_ids)
        if len(self.domain_ids) != views.shape[1]:
            raise ValueError(
                f"domain_ids must hold one domain per sample ({views.shape[1]}), got {len(self.domain_ids)}"
            )
        self.domain_offsets = None if domain_offsets is None else _checked_offsets(domain_offsets, self.domain_ids, views)
        self.generator = torch.Generator().manual_seed(check_non_negative_int("seed", seed))

    def __len__(self) -> int:
        return self.views.shape[1]

    def __getitem__(self, index: int):
        # A worker's copy of self.generator would repeat the same draws in every worker and epoch.
        generator = None if torch.utils.data.get_worker_info() is not None else self.generator
        first, second = torch.randperm(self.views.shape[0], generator=generator)[:2].tolist()
        view_a, view_b = self.views[first, index], self.views[second, index]
        if self.domain_offsets is not None:
            offset = self.domain_offsets[self.domain_ids[index]]
            view_a, view_b = view_a - offset, view_b - offset
        return (view_a, view_b), index

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def __getstate__(self) -> dict:
        # torch pickles a Generator through a temporary state tensor that a spawn or forkserver
        # DataLoader worker cannot attach to (pytorch/pytorch#146828): carry the state as bytes.
        return {**self.__dict__, "generator": self.generator.get_state().numpy().tobytes()}

    def __setstate__(self, state: dict) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        self.__dict__.update(state, generator=generator)


def _checked_offsets(offsets, domain_ids: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """``offsets`` if they are a ``(D, F)`` tensor with a row for every slot in ``domain_ids``."""
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"domain_offsets must be a (D, F) tensor or None, got {type(offsets).__name__}")
    slots = int(domain_ids.max()) + 1 if len(domain_ids) else 0
    if offsets.dim() != 2 or offsets.shape[0] < slots or offsets.shape[1] != views.shape[2]:
        raise ValueError(f"domain_offsets must have shape (D >= {slots}, {views.shape[2]}): a row for every domain "
                         f"slot, as wide as the views; got {tuple(offsets.shape)}")
    return offsets


class _Transformed(torch.utils.data.Dataset):
    """Images of ``dataset`` through ``transform``, labels dropped."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.transform(self.dataset[index][0])


def _weights_digest(module: torch.nn.Module) -> str:
    """Digest of every state-dict entry's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
