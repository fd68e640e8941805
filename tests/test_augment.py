"""Batched MoCo-v2 augmentation against torchvision's single-image functional ops."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from pml_protoot.augment import (
    MoCoV2Augment,
    adjust_brightness,
    decode_transform,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    random_resized_crop_boxes,
    resized_crop,
    rgb_to_grayscale,
)
from pml_protoot.data import MOCO_V2, InMemoryMultiDomainDataset, blur_kernel_size, eval_transform, moco_v2_transform

DTYPES = [torch.float32, torch.float64]


def random_images(batch=6, height=20, width=24, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator, dtype=dtype).to(device)


def per_image(function, images, *per_image_args):
    """``function`` applied image by image (torchvision's ops take one scalar factor per call)."""
    return torch.stack([function(image, *(arg[b].item() for arg in per_image_args)) for b, image in enumerate(images)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "ours, theirs, low, high",
    [
        (adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        (adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        (adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
        (adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_colour_ops_equal_torchvision_image_by_image(ours, theirs, low, high, dtype, device):
    images = random_images(dtype=dtype, device=device)
    images[0] = 0.5  # a gray image: hue undefined, saturation zero
    images[1, :, :4] = 1.0  # saturated white rows: clipping
    factors = torch.linspace(low, high, len(images), dtype=dtype, device=device)
    torch.testing.assert_close(ours(images, factors), per_image(theirs, images, factors), atol=1e-5, rtol=0)


def test_grayscale_equals_torchvision(device):
    images = random_images(device=device)
    expected = TF.rgb_to_grayscale(images, num_output_channels=1)
    torch.testing.assert_close(rgb_to_grayscale(images), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_blur_equals_torchvision_and_sigma_zero_is_the_identity(dtype, device, exact_float32):
    images = random_images(dtype=dtype, device=device)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0, 0.0], dtype=dtype)
    blurred = gaussian_blur(images, 7, sigma)
    for b in range(len(images) - 1):
        expected = TF.gaussian_blur(images[b], [7, 7], [sigma[b].item()] * 2)
        torch.testing.assert_close(blurred[b], expected, atol=1e-6, rtol=0)
    assert torch.equal(blurred[-1], images[-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [16, 40])  # shrinking and enlarging boxes
def test_resized_crop_equals_torchvision_inside_the_border(size, dtype, device):
    images = random_images(batch=4, height=30, width=36, dtype=dtype, device=device)
    boxes = torch.tensor([[0, 0, 30, 36], [3, 5, 20, 12], [10, 0, 20, 36], [7, 20, 9, 16]])
    flip = torch.tensor([False, True, False, True])
    cropped = resized_crop(images, boxes, size, flip)
    assert cropped.shape == (4, 3, size, size) and cropped.dtype == dtype
    for b, (top, left, height, width) in enumerate(boxes.tolist()):
        expected = TF.resized_crop(images[b], top, left, height, width, [size, size], antialias=False)
        expected = TF.horizontal_flip(expected) if flip[b] else expected
        # Output pixels within half an input pixel of the box's edge read the image beyond it,
        # where torchvision clamps to the edge: compare inside them.
        m = math.ceil(size / min(height, width) / 2)
        torch.testing.assert_close(cropped[b, :, m:-m, m:-m], expected[:, m:-m, m:-m], atol=1e-5, rtol=0)
    whole = resized_crop(images, torch.tensor([[0, 0, 30, 36]] * 4), size)
    torch.testing.assert_close(whole, TF.resize(images, [size, size], antialias=False), atol=1e-5, rtol=0)


def test_crop_boxes_fit_follow_scale_and_ratio_and_match_torchvision_statistics():
    generator = torch.Generator().manual_seed(0)
    boxes = random_resized_crop_boxes(20000, 60, 80, (0.2, 1.0), generator=generator)
    top, left, height, width = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 60).all() and (left + width <= 80).all()
    area, aspect = (height * width).double() / (60 * 80), width.double() / height
    assert area.min() > 0.19 and aspect.min() > 3 / 4 * 0.9 and aspect.max() < 4 / 3 * 1.1  # up to rounding
    torch.manual_seed(0)
    image = torch.zeros(1, 60, 80)
    reference = torch.tensor([RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(20000)])
    reference_area = (reference[:, 2] * reference[:, 3]).double() / (60 * 80)
    assert area.mean().item() == pytest.approx(reference_area.mean().item(), abs=0.01)
    assert (top + height / 2).double().mean().item() == pytest.approx(30, abs=0.3)  # centred on average
    assert (left + width / 2).double().mean().item() == pytest.approx(40, abs=0.3)


@pytest.mark.parametrize("height, width", [(60, 80), (90, 30), (40, 40)])
def test_crop_boxes_fall_back_to_torchvisions_central_crop(height, width):
    """A scale no box can reach leaves only the fallback, which torchvision computes too."""
    boxes = random_resized_crop_boxes(3, height, width, (2.0, 3.0))
    expected = RandomResizedCrop.get_params(torch.zeros(1, height, width), [2.0, 3.0], [3 / 4, 4 / 3])
    assert boxes.tolist() == [list(expected)] * 3


def torchvision_chain(image, params, b, image_size, mean, std):
    """One image through torchvision's functional ops, in MoCo-v2's order, with image ``b``'s parameters."""
    top, left, height, width = params.boxes[b].tolist()
    x = TF.resized_crop(image, top, left, height, width, [image_size, image_size], antialias=False)
    if params.jitter[b]:
        jitter_ops = [
            lambda y: TF.adjust_brightness(y, params.brightness[b].item()),
            lambda y: TF.adjust_contrast(y, params.contrast[b].item()),
            lambda y: TF.adjust_saturation(y, params.saturation[b].item()),
            lambda y: TF.adjust_hue(y, params.hue[b].item()),
        ]
        for index in params.jitter_order.tolist():
            x = jitter_ops[index](x)
    if params.grayscale[b]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if params.blur[b]:
        sigma = params.sigma[b].item()
        x = TF.gaussian_blur(x, [blur_kernel_size(image_size)] * 2, [sigma, sigma])
    if params.flip[b]:
        x = TF.horizontal_flip(x)
    return TF.normalize(x, mean, std)


def test_augment_equals_the_torchvision_chain_image_by_image(device, exact_float32):
    augment = MoCoV2Augment(40, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)).to(device)
    images = torch.randint(0, 256, (24, 3, 80, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    params = augment.sample_params(24, 80, 90, generator=torch.Generator().manual_seed(2))
    # Boxes of at least the output side never sample beyond their edge (see resized_crop), so
    # every pixel, and the contrast op's mean over all of them, can be compared.
    params.boxes = random_resized_crop_boxes(24, 80, 90, (0.6, 1.0), generator=torch.Generator().manual_seed(3))
    assert params.boxes[:, 2:].min() >= 40
    assert params.jitter.any() and (~params.jitter).any() and params.grayscale.any() and params.blur.any()
    views = augment.apply(images.to(device), params)
    assert views.shape == (24, 3, 40, 40) and views.dtype == torch.float32 and views.device.type == device.type
    mean, std = augment.mean.flatten().tolist(), augment.std.flatten().tolist()
    for b in range(24):
        expected = torchvision_chain(images[b].to(device) / 255, params, b, 40, mean, std)
        torch.testing.assert_close(views[b], expected, atol=1e-4, rtol=0)


def test_augment_parameter_probabilities_and_ranges():
    params = MoCoV2Augment(32).sample_params(20000, 40, 40, generator=torch.Generator().manual_seed(0))
    for flags, probability in [(params.jitter, MOCO_V2["jitter_p"]), (params.grayscale, MOCO_V2["grayscale_p"]),
                               (params.blur, MOCO_V2["blur_p"]), (params.flip, 0.5)]:
        assert flags.double().mean().item() == pytest.approx(probability, abs=0.015)
    for values, (low, high) in [(params.brightness, (0.6, 1.4)), (params.hue, (-0.1, 0.1)),
                                (params.sigma, MOCO_V2["blur_sigma"])]:
        assert low <= values.min() and values.max() <= high and values.std() > (high - low) / 4
    assert sorted(params.jitter_order.tolist()) == [0, 1, 2, 3]


def test_augment_is_seeded_independent_per_image_and_takes_uint8_or_float():
    augment = MoCoV2Augment(24)
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    batch = image.expand(8, -1, -1, -1)
    first = augment(batch, generator=torch.Generator().manual_seed(3))
    again = augment(batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert all(not torch.equal(first[0], first[b]) for b in range(1, 8))  # every copy its own draw
    as_float = augment(batch.float() / 255, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(as_float, first)
    assert augment(batch.double() / 255).dtype == torch.float64


def test_augment_with_identity_parameters_only_resizes_and_normalises():
    augment = MoCoV2Augment(16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    images = random_images(batch=3, height=16, width=16)
    params = augment.sample_params(3, 16, 16)
    params.boxes[:] = torch.tensor([0, 0, 16, 16])
    for flag in (params.flip, params.jitter, params.grayscale, params.blur):
        flag[:] = False
    torch.testing.assert_close(augment.apply(images, params), images, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(2, 1, 8, 8), r"\(B, 3, H, W\) tensor, got \(2, 1, 8, 8\)"),
        (torch.zeros(3, 8, 8), r"got \(3, 8, 8\)"),
        ([[0.0]], "got list"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int32), "uint8 .* or float .* got dtype torch.int32"),
        (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), "at least one image, got a batch of 0"),
        (torch.full((2, 3, 8, 8), 255.0), r"float images must lie in \[0, 1\] .* got values in \[255, 255\]"),
        (torch.full((2, 3, 8, 8), -0.5, dtype=torch.float64), r"got values in \[-0.5, -0.5\]"),
        (torch.full((2, 3, 8, 8), float("nan")), r"got values in \[nan, nan\]"),
    ],
)
def test_augment_bad_input(images, match):
    with pytest.raises(ValueError, match=match):
        MoCoV2Augment(8)(images)


def test_augment_bad_size():
    with pytest.raises(ValueError, match="image_size must be a positive integer, got 0"):
        MoCoV2Augment(0)


def test_augment_mean_and_std_take_one_value_for_every_channel_or_three():
    images = random_images(batch=2, height=16, width=16)
    one, three = MoCoV2Augment(16, mean=(0.5,), std=(0.25,)), MoCoV2Augment(16, mean=(0.5,) * 3, std=(0.25,) * 3)
    params = one.sample_params(2, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one.apply(images, params), three.apply(images, params))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(std=(0.0, 0.0, 0.0)), ValueError, r"std\[0\] must be a finite number > 0, got 0.0"),  # inf and NaN
        (dict(std=(0.2, -0.1, 0.2)), ValueError, r"std\[1\] must be a finite number > 0, got -0.1"),
        (dict(mean=(0.5, float("nan"), 0.5)), ValueError, r"mean\[1\] must be a finite number, got nan"),
        (dict(mean=(0.5, 0.5)), ValueError, r"mean must be 1 or 3 numbers \(R, G, B\), got 2"),
        (dict(std=None), TypeError, "std must be 1 or 3 numbers .* got NoneType"),
        (dict(mean="0.5"), TypeError, "mean must be 1 or 3 numbers .* got str"),
        # 0-255 statistics on [0, 1] images made every output nearly constant, silently
        (dict(mean=(123.7, 116.3, 103.5)), ValueError,
         r"mean must hold statistics of images in \[0, 1\], at most 1, got \(123.7, 116.3, 103.5\): divide 0-255"),
        (dict(std=(58.4, 57.1, 57.4)), ValueError, r"std must hold statistics of images in \[0, 1\]"),
    ],
)
@pytest.mark.parametrize("make", [MoCoV2Augment, moco_v2_transform, eval_transform])
def test_augment_bad_mean_or_std(make, kwargs, error, match):
    """The PIL pipelines too: torchvision's Normalize takes NaN silently and refuses a zero std only
    at the first image."""
    with pytest.raises(error, match=match):
        make(8, **kwargs)


def test_blur_kernel_matches_the_pil_pipeline():
    assert blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3
    assert MoCoV2Augment(224).blur_kernel == 23
    assert math.isclose(MOCO_V2["jitter_p"], 0.8)


def test_decode_transform_scales_16_bit_grayscale_as_the_datasets_read_it():
    """PIL's own conversion clips 16-bit levels at 255: a mid-grey image came out white."""
    grey = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    read = InMemoryMultiDomainDataset({("a", "x"): [grey], ("b", "x"): [grey]}, ["a", "b"], ["x"])[0][0]
    decoded = decode_transform(8)(grey)
    assert np.asarray(read).mean() == 128
    assert decoded.float().mean().item() == 128


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_decode_transform_is_an_rgb_uint8_square_resized_as_pil_does(mode):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    decoded = decode_transform(32)(image)  # floor(32 * 256 / 224) = 36, the eval view's Resize side
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 36, 36)
    expected = np.asarray(image.convert("RGB").resize((36, 36), Image.BILINEAR))
    assert np.array_equal(decoded.permute(1, 2, 0).numpy(), expected)
    assert decode_transform().transforms[1].size == (256, 256)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        decode_transform(-1)
