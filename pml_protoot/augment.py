r"""MoCo-v2 augmentation of whole image batches on their own device.

:func:`~pml_protoot.data.moco_v2_transform` augments one PIL image at a time in
``DataLoader`` workers; fine-tuning a trunk on a GPU then waits for the CPU (on an
H200 machine, 16 workers delivered about 90 images a second against the GPU's 2,000).
:class:`MoCoV2Augment` draws every image's own random parameters, as the PIL pipeline
does, and applies them to a ``(B, 3, H, W)`` batch in a fixed number of tensor
operations: pass it as ``ProtoOTTrainer(batch_transform=...)`` with a dataset of
decoded ``uint8`` images.

The functions below are the batched operations, each with per-image parameters and the
formula it computes; every one equals torchvision's single-image functional op on
float tensors (see the tests). The exception is :func:`resized_crop`: it matches
``antialias=False``, and only away from the box's edge (its outputs within half an
input pixel of the edge read the image beyond the box).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

from ._checks import check_per_channel, check_positive_int
from ._tensors import at_least_float32
from .data import MOCO_V2, _as_rgb, blur_kernel_size, eval_resize_side

__all__ = [
    "MoCoV2Augment",
    "decode_transform",
    "decoded_side",
    "MoCoV2Params",
    "random_resized_crop_boxes",
    "resized_crop",
    "rgb_to_grayscale",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "gaussian_blur",
]

#: ITU-R 601 luma weights of R, G, B (torchvision's and PIL's grayscale).
LUMA = (0.2989, 0.587, 0.114)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, 1, 1)``, to broadcast over ``(B, C, H, W)``."""
    return values.reshape(-1, 1, 1, 1)


def random_resized_crop_boxes(
    batch_size: int, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), *, generator=None, tries=10
) -> torch.Tensor:
    r"""``(B, 4)`` long crop boxes ``(top, left, box_height, box_width)``, torchvision's
    ``RandomResizedCrop.get_params`` drawn for ``B`` images at once.

    Each image tries ``tries`` times: area fraction :math:`a \sim U(\text{scale})`, aspect
    :math:`r = e^{u}`, :math:`u \sim U(\log \text{ratio})`, box width
    :math:`\mathrm{round}(\sqrt{a H W r})` and height :math:`\mathrm{round}(\sqrt{a H W / r})`;
    the first box that fits is placed uniformly. Images with no fitting try get the
    central crop of the whole image with its aspect clamped to ``ratio``.
    """
    area = torch.empty(batch_size, tries).uniform_(*scale, generator=generator) * (height * width)
    log_ratio = torch.empty(batch_size, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    box_w = torch.sqrt(area * aspect).round().long()
    box_h = torch.sqrt(area / aspect).round().long()
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # index of the first fitting try (0 when none fits)
    box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
    top = (torch.rand(batch_size, generator=generator) * (height - box_h + 1)).long().clamp(max=height - box_h)
    left = (torch.rand(batch_size, generator=generator) * (width - box_w + 1)).long().clamp(max=width - box_w)
    boxes = torch.stack([top, left, box_h, box_w], dim=1)
    boxes[~fits.any(dim=1)] = _central_box(height, width, ratio)
    return boxes


def _central_box(height: int, width: int, ratio) -> torch.Tensor:
    """The whole image, its aspect clamped to ``ratio``, centred: the fallback box."""
    if width / height < min(ratio):
        box_w, box_h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        box_w, box_h = round(height * max(ratio)), height
    else:
        box_w, box_h = width, height
    return torch.tensor([(height - box_h) // 2, (width - box_w) // 2, box_h, box_w])


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    r"""Crop box ``b`` of image ``b`` and resize it to ``size x size`` (bilinear), mirrored where ``flip``.

    Output pixel :math:`o` of a box at ``left`` of width :math:`w` samples the input at
    :math:`x = \text{left} + (o + \tfrac12)\,w / \text{size} - \tfrac12` (the same in
    :math:`y`), the sampling of ``interpolate(align_corners=False)`` on the cropped image,
    without antialiasing; samples in the outermost half pixel read the image beyond the
    box where ``interpolate`` would clamp to its edge.

    Args:
        images: ``(B, C, H, W)`` float.
        boxes: ``(B, 4)`` ``(top, left, box_height, box_width)`` in pixels.
        size: output side.
        flip: ``(B,)`` bool, mirror left-right (``None``: no flip).

    Returns:
        ``(B, C, size, size)``.
    """
    _, _, height, width = images.shape
    top, left, box_h, box_w = boxes.to(images.device, images.dtype).unbind(dim=1)
    x_scale = box_w / width
    if flip is not None:
        x_scale = torch.where(flip.to(images.device), -x_scale, x_scale)
    theta = torch.zeros(len(images), 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = x_scale  # normalised coordinates: u_in = (w / W) u_out + (2 left + w) / W - 1
    theta[:, 0, 2] = (2 * left + box_w) / width - 1
    theta[:, 1, 1] = box_h / height
    theta[:, 1, 2] = (2 * top + box_h) / height - 1
    grid = F.affine_grid(theta, [len(images), images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    r"""``(B, 1, H, W)`` luma :math:`0.2989 R + 0.587 G + 0.114 B` of ``(B, 3, H, W)`` images."""
    weights = images.new_tensor(LUMA).reshape(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{clip}_{[0,1]}(f_b\,x_b)` for ``(B, C, H, W)`` images in [0, 1] and ``(B,)`` factors."""
    return (images * _per_image(factor)).clamp(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{clip}_{[0,1]}(f_b\,x_b + (1 - f_b)\,\bar g_b)`, :math:`\bar g_b` the mean luma of image ``b``."""
    mean_luma = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    factor = _per_image(factor)
    return (factor * images + (1 - factor) * mean_luma).clamp(0, 1)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{clip}_{[0,1]}(f_b\,x_b + (1 - f_b)\,g_b)`, :math:`g_b` the luma image of ``b``."""
    factor = _per_image(factor)
    return (factor * images + (1 - factor) * rgb_to_grayscale(images)).clamp(0, 1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    r"""Rotate the HSV hue of image ``b`` by ``shift[b]`` turns (in [-0.5, 0.5]): :math:`h \to (h + s_b) \bmod 1`.

    From RGB in [0, 1]: :math:`V = \max`, :math:`C = \max - \min`, :math:`S = C / V`,
    :math:`6H = (G - B)/C \bmod 6`, :math:`(B - R)/C + 2` or :math:`(R - G)/C + 4` by the
    largest channel. Back: channel :math:`n \in (5, 3, 1)` for R, G, B is
    :math:`V - V S \max(0, \min(k, 4 - k, 1))`, :math:`k = (n + 6H) \bmod 6`.
    """
    red, green, blue = images.unbind(dim=1)
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue6 = torch.where(
        value == red,
        ((green - blue) / safe_chroma).remainder(6),
        torch.where(value == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4),
    )
    hue6 = torch.where(chroma > 0, hue6, torch.zeros_like(hue6))
    hue6 = (hue6 + 6 * shift.reshape(-1, 1, 1)).remainder(6)
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    sectors = images.new_tensor([5.0, 3.0, 1.0]).reshape(1, 3, 1, 1)
    k = (sectors + hue6[:, None]).remainder(6)
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value[:, None] * (1 - saturation[:, None] * ramp)


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    r"""Blur image ``b`` with a ``kernel_size`` Gaussian of std ``sigma[b]`` pixels (reflect padding).

    Separable kernel :math:`w_i \propto \exp(-i^2 / 2\sigma_b^2)`,
    :math:`|i| \le (k - 1) / 2`, normalised to sum 1; a ``sigma`` of 0 is the identity.
    All images go through one grouped convolution per axis.
    """
    batch, channels, height, width = images.shape
    offsets = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - (kernel_size - 1) / 2
    sigma = sigma.to(images.device, images.dtype)[:, None]
    gaussian = -(offsets**2) / (2 * sigma.clamp(min=torch.finfo(images.dtype).tiny) ** 2)
    delta = torch.where(offsets == 0, 0.0, -torch.inf)  # its softmax is the identity kernel
    kernels = torch.softmax(torch.where(sigma > 0, gaussian, delta), dim=1)  # (B, k)
    kernels = kernels.repeat_interleave(channels, dim=0)  # one per (image, channel) group
    pad = kernel_size // 2
    flat = F.pad(images.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernels[:, None, :, None], groups=batch * channels)
    flat = F.conv2d(flat, kernels[:, None, None, :], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


@dataclass
class MoCoV2Params:
    """Random parameters of one :class:`MoCoV2Augment` call, one entry per image (``B`` images).

    Attributes:
        boxes: ``(B, 4)`` long crop boxes ``(top, left, height, width)``.
        flip: ``(B,)`` bool, mirror left-right.
        jitter: ``(B,)`` bool, colour jitter applied (probability 0.8).
        brightness, contrast, saturation: ``(B,)`` factors in [0.6, 1.4].
        hue: ``(B,)`` shifts in [-0.1, 0.1] turns.
        jitter_order: ``(4,)`` long permutation of brightness, contrast, saturation, hue
            (one order for the whole batch).
        grayscale: ``(B,)`` bool (probability 0.2).
        blur: ``(B,)`` bool (probability 0.5).
        sigma: ``(B,)`` blur std in [0.1, 2] pixels.
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    jitter_order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor

    def to(self, device) -> "MoCoV2Params":
        return MoCoV2Params(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class MoCoV2Augment(torch.nn.Module):
    r"""MoCo-v2 augmentation of a ``(B, 3, H, W)`` batch, every image with its own random draw.

    The batched counterpart of :func:`~pml_protoot.data.moco_v2_transform`, with its
    parameters: RandomResizedCrop to ``image_size`` (scale 0.2–1, aspect 3/4–4/3), colour
    jitter 0.4/0.4/0.4/0.1 with p = 0.8, grayscale p = 0.2, Gaussian blur (σ 0.1–2,
    kernel about a tenth of the side) with p = 0.5, horizontal flip p = 0.5, then
    ``(x - mean) / std``. It runs where the images are, in float arithmetic, so the
    outputs differ from the PIL pipeline by its uint8 rounding; two further differences:
    the jitter's random order of its four operations is drawn once per batch (torchvision
    draws it per image) and resizing is bilinear without antialiasing: a crop larger than
    ``image_size`` shrinks by at most 1 - ``image_size``/side (12.5 % for the 256 px squares
    of :func:`decode_transform` at 224, where about 30 % of the crops are larger).

    Random parameters come from torch's CPU generator (or ``generator``), so a seeded run
    draws the same views on every device.

    Args:
        image_size: output side ``S``.
        mean, std: per-channel normalisation, three finite numbers (R, G, B) or one for every
            channel, statistics of images in [0, 1] (at most 1); ``std > 0``. ImageNet's by
            default, which most timm weights expect; take your trunk's from
            ``timm.data.resolve_data_config(model=trunk)`` (``tf_efficientnet_lite0``, for one,
            wants 0.5/0.5).

    Raises:
        TypeError: ``image_size`` not an integer, or ``mean`` / ``std`` not one or a sequence of
            real numbers.
        ValueError: ``image_size < 1``, ``mean`` / ``std`` not 1 or 3 values, not finite, above 1
            (0-255 statistics), or a ``std`` value <= 0; on a call, images that are not
            ``(B >= 1, 3, H, W)`` ``uint8`` or float in [0, 1].

    Shape:
        - Input: ``(B, 3, H, W)``, ``uint8`` (0–255) or float in [0, 1], any device.
        - Output: ``(B, 3, S, S)`` float32 (float64 for float64 input), same device.

    Example:
        >>> import torch
        >>> from pml_protoot.augment import MoCoV2Augment
        >>> images = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8)
        >>> views = MoCoV2Augment(32)(images)
        >>> views.shape, views.dtype
        (torch.Size([4, 3, 32, 32]), torch.float32)
    """

    def __init__(self, image_size: int = 224, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        super().__init__()
        self.image_size = check_positive_int("image_size", image_size)
        self.blur_kernel = blur_kernel_size(image_size)
        for name, values in (("mean", mean), ("std", std)):
            channels = torch.tensor(check_per_channel(name, values, positive=name == "std"), dtype=torch.float32)
            self.register_buffer(name, channels.reshape(1, 3, 1, 1), persistent=False)

    def sample_params(self, batch_size: int, height: int, width: int, generator=None) -> MoCoV2Params:
        """Draw the random parameters for ``batch_size`` images of ``height x width`` (on the CPU)."""

        def uniform(low, high):
            return torch.empty(batch_size).uniform_(low, high, generator=generator)

        def coin(p):
            return torch.rand(batch_size, generator=generator) < p

        brightness, contrast, saturation, hue = MOCO_V2["jitter"]
        return MoCoV2Params(
            boxes=random_resized_crop_boxes(batch_size, height, width, MOCO_V2["crop_scale"], generator=generator),
            flip=coin(0.5),
            jitter=coin(MOCO_V2["jitter_p"]),
            brightness=uniform(1 - brightness, 1 + brightness),
            contrast=uniform(1 - contrast, 1 + contrast),
            saturation=uniform(1 - saturation, 1 + saturation),
            hue=uniform(-hue, hue),
            jitter_order=torch.randperm(4, generator=generator),
            grayscale=coin(MOCO_V2["grayscale_p"]),
            blur=coin(MOCO_V2["blur_p"]),
            sigma=uniform(*MOCO_V2["blur_sigma"]),
        )

    def apply(self, images: torch.Tensor, params: MoCoV2Params) -> torch.Tensor:
        """The augmentation of ``images`` with the given parameters (see the class docstring)."""
        x = _as_unit_float(images)
        jitter_order = params.jitter_order.tolist()  # read on the CPU: no device sync
        params = params.to(x.device)
        x = resized_crop(x, params.boxes, self.image_size, params.flip)
        x = self._jitter(x, params, jitter_order)
        x = torch.where(_per_image(params.grayscale), rgb_to_grayscale(x).expand_as(x), x)
        x = gaussian_blur(x, self.blur_kernel, torch.where(params.blur, params.sigma, 0.0))
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)

    def forward(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        _check_images(images)
        return self.apply(images, self.sample_params(len(images), *images.shape[-2:], generator=generator))

    @staticmethod
    def _jitter(x: torch.Tensor, params: MoCoV2Params, order: list[int]) -> torch.Tensor:
        """Brightness, contrast, saturation and hue in ``jitter_order``; images without jitter pass unchanged."""
        identity = torch.ones_like(params.brightness)
        operations = [
            lambda y: adjust_brightness(y, torch.where(params.jitter, params.brightness, identity)),
            lambda y: adjust_contrast(y, torch.where(params.jitter, params.contrast, identity)),
            lambda y: adjust_saturation(y, torch.where(params.jitter, params.saturation, identity)),
            lambda y: torch.where(_per_image(params.jitter), adjust_hue(y, params.hue), y),  # HSV round trips are inexact
        ]
        for index in order:
            x = operations[index](x)
        return x

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, blur_kernel={self.blur_kernel}"


def decode_transform(image_size: int = 224) -> T.Compose:
    """PIL image -> ``(3, R, R)`` uint8 tensor, ``R = floor(image_size * 256 / 224)`` (the eval
    view's resize side; 256 for 224): what a dataset gives :class:`MoCoV2Augment` ``(image_size)``.

    Squaring the image changes its aspect, as the eval view's ``Resize(256)`` does not;
    the random crop's aspect range (3/4 to 4/3) covers most photographs' difference.

    Example:
        >>> from PIL import Image
        >>> from pml_protoot.augment import decode_transform
        >>> image = decode_transform(224)(Image.new("RGB", (300, 200)))
        >>> image.shape, image.dtype
        (torch.Size([3, 256, 256]), torch.uint8)
    """
    side = decoded_side(check_positive_int("image_size", image_size))
    return T.Compose([T.Lambda(_as_rgb), T.Resize((side, side)), T.PILToTensor()])


def decoded_side(image_size: int) -> int:
    """Side of :func:`decode_transform`'s square images for views of ``image_size``: the eval view's
    resize side (256 for 224)."""
    return eval_resize_side(image_size)


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise ValueError(f"images must be uint8 (0-255) or float in [0, 1], got dtype {images.dtype}")
    if len(images) == 0:
        raise ValueError("images must hold at least one image, got a batch of 0")
    # Float input only (a device sync; the uint8 path has none): 0-255 floats would clip to white.
    if images.is_floating_point() and not bool(((images >= 0) & (images <= 1)).all()):
        low, high = images.min().item(), images.max().item()
        raise ValueError(f"float images must lie in [0, 1] (uint8 for 0-255), got values in [{low:g}, {high:g}]")


def _as_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0-255 -> float32 in [0, 1]; float32/64 kept; half precision computed in float32."""
    return images.float() / 255 if images.dtype == torch.uint8 else at_least_float32(images)
