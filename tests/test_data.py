"""Multi-domain folders, two views, the synthetic demo set, transforms, trunk features and the feature cache."""
import logging
import os
import pickle
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import pml_protoot.data as data_module
from pml_protoot.data import (
    CachedTwoViewDataset,
    InMemoryMultiDomainDataset,
    domain_means,
    FeatureCache,
    MultiDomainDataset,
    MultiDomainImageFolder,
    TwoViewDataset,
    eval_transform,
    make_synthetic_domains,
    moco_v2_transform,
    first_item,
    trunk_features,
)

# domain -> class -> number of images; "zebra" exists in one domain only.
LAYOUT = {"art": {"cat": 2, "dog": 1}, "photo": {"dog": 3, "zebra": 1}, "sketch": {"cat": 1}}


def write_layout(root, layout=LAYOUT, size=8):
    for d_index, (domain, classes) in enumerate(layout.items()):
        for c_index, (name, count) in enumerate(classes.items()):
            folder = root / domain / name
            folder.mkdir(parents=True)
            for k in range(count):
                colour = (40 * d_index, 40 * c_index, 20 * k)
                Image.new("RGB", (size, size), colour).save(folder / f"img{k}.jpg")
    return root


def test_folder_indexes_domains_classes_and_samples(tmp_path):
    data = MultiDomainImageFolder(write_layout(tmp_path))
    assert data.domains == ["art", "photo", "sketch"]
    assert data.classes == ["cat", "dog", "zebra"]
    # Reference built by walking the layout plainly.
    expected = []
    for slot, domain in enumerate(sorted(LAYOUT)):
        for name in sorted(LAYOUT[domain]):
            for k in range(LAYOUT[domain][name]):
                expected.append((str(tmp_path / domain / name / f"img{k}.jpg"), ["cat", "dog", "zebra"].index(name), slot))
    assert data.samples == expected
    assert data.targets == [label for _, label, _ in expected]
    assert data.domain_ids.dtype == torch.long and data.domain_ids.tolist() == [slot for *_, slot in expected]
    image, label = data[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == expected[3][1]


def test_folder_selected_domains_keep_given_order_and_transform(tmp_path):
    data = MultiDomainImageFolder(write_layout(tmp_path), domains=["sketch", "art"], transform=eval_transform(8))
    assert data.domains == ["sketch", "art"] and data.classes == ["cat", "dog"]
    assert data.domain_ids.tolist() == [0, 1, 1, 1]
    assert data[0][0].shape == (3, 8, 8)


def test_folder_fingerprint_follows_content_not_location_or_mtime(tmp_path):
    import shutil

    root = write_layout(tmp_path / "a")
    fingerprint = MultiDomainImageFolder(root).fingerprint()
    copy = shutil.copytree(root, tmp_path / "b")  # a fresh copy: new paths and mtimes
    image = copy / "photo" / "dog" / "img0.jpg"
    os.utime(image, ns=(0, 0))
    assert MultiDomainImageFolder(copy).fingerprint() == fingerprint
    Image.new("RGB", (8, 8), (1, 2, 3)).save(image)  # same name, new pixels
    edited = MultiDomainImageFolder(copy).fingerprint()
    assert edited != fingerprint
    image.rename(image.with_name("img9.jpg"))  # same bytes, new name
    assert MultiDomainImageFolder(copy).fingerprint() not in (fingerprint, edited)


def test_subset_holds_one_domain_with_labels(tmp_path):
    data = MultiDomainImageFolder(write_layout(tmp_path))
    photo = data.subset("photo")
    assert len(photo) == 4
    assert [photo[i][1] for i in range(len(photo))] == [1, 1, 1, 2]
    with pytest.raises(ValueError, match="domain must be one of"):
        data.subset("cartoon")


def test_folder_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="root"):
        MultiDomainImageFolder(tmp_path / "absent")
    root = write_layout(tmp_path / "data")
    with pytest.raises(ValueError, match=r"\['cartoon'\] not found.*available domains: \['art', 'photo', 'sketch'\]"):
        MultiDomainImageFolder(root, domains=["art", "cartoon"])
    with pytest.raises(ValueError, match="at least two domains"):
        MultiDomainImageFolder(root, domains=["art"])
    with pytest.raises(TypeError, match="domains"):
        MultiDomainImageFolder(root, domains="art")
    with pytest.raises(TypeError, match="extensions must be a sequence of file name endings.*got the string '.png'"):
        MultiDomainImageFolder(root, extensions=".png")
    with pytest.raises(TypeError, match="extensions must be a sequence of file name endings.*got NoneType"):
        MultiDomainImageFolder(root, extensions=None)
    with pytest.raises(TypeError, match="extensions must be a sequence of file name endings.*got int 3 among them"):
        MultiDomainImageFolder(root, extensions=[".png", 3])
    with pytest.raises(ValueError, match=r"domains must be distinct, got \['art', 'art'\]"):
        MultiDomainImageFolder(root, domains=["art", "art"])
    (root / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="'empty' holds no images"):
        MultiDomainImageFolder(root, domains=["art", "empty"])


BLANK = Image.new("RGB", (4, 4))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: InMemoryMultiDomainDataset({("a", "x"): [BLANK], ("b", "x"): [BLANK]}, ["a", "a", "b"], ["x"]),
         r"domains must be distinct, got \['a', 'a', 'b'\]"),
        (lambda: InMemoryMultiDomainDataset({("a", "x"): [BLANK], ("b", "x"): [BLANK]}, ["a", "b"], ["x", "x"]),
         r"classes must be distinct, got \['x', 'x'\]"),
        (lambda: MultiDomainDataset(["a", "b"], ["x"], [("p", 0, 0), ("q", 0, 1), ("r", 0, 2)], None),
         r"domain slots of samples .* must lie in \[0, 2\), got \[2\]"),
    ],
)
def test_dataset_refuses_repeated_names_and_slots_out_of_range(build, match):
    """A name given twice would make a domain retrieve its own images, or hold every image twice."""
    with pytest.raises(ValueError, match=match):
        build()


def test_an_unlabelled_dataset_may_use_minus_one():
    """Training reads no labels: a set without classes is a MultiDomainDataset too."""
    unlabelled = MultiDomainDataset(["a", "b"], [], [("p", -1, 0), ("q", -1, 1)], None)
    assert unlabelled.targets == [-1, -1] and unlabelled.domain_ids.tolist() == [0, 1]


def test_hidden_folders_and_files_are_neither_domains_classes_nor_images(tmp_path):
    root = write_layout(tmp_path)
    for hidden in (root / ".git" / "objects", root / "art" / ".ipynb_checkpoints"):
        hidden.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(hidden / "stray.jpg")
    Image.new("RGB", (8, 8)).save(root / "art" / "cat" / "._0.jpg")  # what macOS leaves beside copied files
    (root / "art" / "cat" / "folder.jpg").mkdir()
    data = MultiDomainImageFolder(root)
    assert data.domains == ["art", "photo", "sketch"] and data.classes == ["cat", "dog", "zebra"]
    assert len(data) == len(MultiDomainImageFolder(write_layout(tmp_path / "clean")))
    assert not any("/." in path or path.endswith("folder.jpg") for path, _, _ in data.samples)


@pytest.mark.parametrize("layout", ["empty", "nested"])
def test_a_class_folder_without_images_in_any_domain_is_refused(layout, tmp_path):
    """It would count as a class (and a prototype) with no sample; images in its sub-folders are not read."""
    root = write_layout(tmp_path)
    for domain in ("art", "photo"):
        (root / domain / "unicorn" / "sub").mkdir(parents=True)
        if layout == "nested":
            Image.new("RGB", (8, 8)).save(root / domain / "unicorn" / "sub" / "0.jpg")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['unicorn'\] .* hold no image directly inside"):
        MultiDomainImageFolder(root)


def test_16_bit_grayscale_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    root = write_layout(tmp_path)
    gray = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(gray.astype(np.uint16) * 257).save(root / "art" / "cat" / "img0.png")  # mode I;16
    Image.fromarray(gray).save(root / "art" / "dog" / "img0.png")  # the same picture in 8 bits
    data = MultiDomainImageFolder(root)
    sixteen, eight = (data.load_image(str(root / "art" / name / "img0.png")) for name in ("cat", "dog"))
    assert Image.open(root / "art" / "cat" / "img0.png").mode.startswith("I")
    assert sixteen.mode == "RGB" and np.array_equal(np.asarray(sixteen), np.asarray(eight))


def test_in_memory_16_bit_images_read_as_the_folder_reads_them(tmp_path):
    root = write_layout(tmp_path)
    gray = (np.arange(64).reshape(8, 8) * 4).astype(np.uint16) * 257
    Image.fromarray(gray).save(root / "art" / "cat" / "img0.png")
    from_file = MultiDomainImageFolder(root).load_image(str(root / "art" / "cat" / "img0.png"))
    in_memory = InMemoryMultiDomainDataset(
        {("art", "cat"): [Image.open(root / "art" / "cat" / "img0.png")], ("photo", "cat"): [Image.new("RGB", (8, 8))]},
        ["art", "photo"], ["cat"],
    )
    image = in_memory.load_image(in_memory.samples[0][0])
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(from_file))


def test_unreadable_image_error_names_the_file(tmp_path):
    root = write_layout(tmp_path)
    broken = root / "art" / "cat" / "img0.jpg"
    broken.write_bytes(b"not a jpeg")
    data = MultiDomainImageFolder(root)
    with pytest.raises(OSError, match=str(broken)):
        data[0]


def test_pacs_mini_layout(pacs_mini):
    data = MultiDomainImageFolder(pacs_mini)
    counts = {d: len(data.subset(d)) for d in data.domains}
    assert counts == {"art_painting": 411, "cartoon": 471, "photo": 337, "sketch": 788}
    assert data.classes == ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    assert len(data) == 2007
    for domain in data.domains:  # every file on disk is indexed under its class folder
        on_disk = sorted(str(p) for p in (pacs_mini / domain).rglob("*") if p.is_file())
        assert sorted(data.samples[i][0] for i in data.domain_indices(domain).tolist()) == on_disk
    image, label = data[int(data.domain_indices("sketch")[0])]
    assert image.mode == "RGB" and data.classes[label] == "dog"


def test_two_view_dataset_replaces_label_by_index():
    class LabelTrap(torch.utils.data.Dataset):
        domain_ids = torch.tensor([0, 1, 1])

        def __len__(self):
            return 3

        def __getitem__(self, index):
            return torch.full((2,), float(index)), object()  # an unusable label

    views = TwoViewDataset(LabelTrap(), lambda x: x * 2, lambda x: x + 1)
    (query, key), index = views[2]
    assert index == 2 and torch.equal(query, torch.tensor([4.0, 4.0])) and torch.equal(key, torch.tensor([3.0, 3.0]))
    assert torch.equal(views.domain_ids, LabelTrap.domain_ids) and len(views) == 3
    with pytest.raises(TypeError, match="callable"):
        TwoViewDataset(LabelTrap(), None, lambda x: x)


@pytest.mark.parametrize(
    "item, error, match",
    [
        ((1, 2, 3), ValueError, r"items must be \(image, class_label\) tuples, got a tuple of length 3"),
        (torch.zeros(2, 3), TypeError, r"items must be \(image, class_label\) tuples, got a Tensor"),  # unpacked rows
    ],
)
def test_two_view_dataset_names_an_item_that_is_not_image_and_label(item, error, match):
    with pytest.raises(error, match=match):
        TwoViewDataset([item], lambda x: x, lambda x: x)[0]


@pytest.mark.parametrize("wrap", [lambda data: data, lambda data: data.subset("outline")])
def test_two_view_dataset_over_a_dataset_with_its_own_transform_names_the_cause(wrap):
    """The views of an image dataset take its PIL images: a dataset built with eval_transform (its images
    already tensors) failed in torchvision with "pic should be PIL Image or ndarray", naming neither."""
    data = make_synthetic_domains(num_classes=2, images_per_class=2, image_size=16, transform=eval_transform(16))
    views = TwoViewDataset(wrap(data), moco_v2_transform(16), moco_v2_transform(16))
    with pytest.raises(TypeError, match=r"dataset's own transform \(Compose\) already made them a Tensor, which a view "
                                        r"refused .*; build the dataset with transform=None and put its transform "
                                        r"into query_transform and key_transform") as raised:
        views[0]
    assert isinstance(raised.value.__cause__, TypeError) and "PIL Image" in str(raised.value.__cause__)
    data.transform = None  # as the message says
    (query, key), index = views[0]
    assert query.shape == key.shape == (3, 16, 16) and index == 0


def test_two_view_dataset_leaves_views_on_tensors_and_other_failures_alone():
    data = make_synthetic_domains(num_classes=2, images_per_class=2, image_size=16, transform=eval_transform(16))
    (query, key), _ = TwoViewDataset(data, lambda x: x.flip(-1), lambda x: x * 2)[3]  # views on tensors: fine
    assert torch.equal(query, data[3][0].flip(-1)) and torch.equal(key, data[3][0] * 2)

    def broken(image):
        raise TypeError("a view's own bug")

    data.transform = None  # PIL images: the view's own error, as it was
    with pytest.raises(TypeError, match="^a view's own bug$"):
        TwoViewDataset(data, broken, broken)[0]


def test_synthetic_set_is_seeded_imbalanced_and_fast():
    start = time.perf_counter()
    data = make_synthetic_domains(num_classes=5, images_per_class=(40, 20), domains=("filled", "outline"), seed=3)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    counts = {d: np.bincount(np.array(data.targets)[data.domain_indices(d).numpy()]).tolist() for d in data.domains}
    assert counts == {"filled": [40, 35, 30, 25, 20], "outline": [35, 30, 25, 20, 40]}
    again = make_synthetic_domains(num_classes=5, images_per_class=(40, 20), seed=3)
    other = make_synthetic_domains(num_classes=5, images_per_class=(40, 20), seed=4)
    assert np.array_equal(np.asarray(data[7][0]), np.asarray(again[7][0]))
    assert not np.array_equal(np.asarray(data[7][0]), np.asarray(other[7][0]))
    assert data.fingerprint() == again.fingerprint() != other.fingerprint()


def test_synthetic_domains_look_different():
    data = make_synthetic_domains(num_classes=3, images_per_class=6, domains=("filled", "outline", "dots"))
    white_fraction = {}
    for domain in data.domains:
        pixels = np.stack([np.asarray(data[i][0]) for i in data.domain_indices(domain).tolist()])
        white_fraction[domain] = float((pixels == 255).all(-1).mean())
    # Line drawings sit on white; filled shapes sit on a noisy tinted background.
    assert white_fraction["filled"] < 0.05
    assert white_fraction["outline"] > 0.7 and white_fraction["dots"] > 0.7


def test_synthetic_classes_differ_within_a_domain():
    """Mean binary mask of the shape classes differ: the class is visible in the pixels."""
    data = make_synthetic_domains(num_classes=3, images_per_class=30, domains=("outline", "dots"), image_size=32)
    ink = np.stack([(np.asarray(data[i][0]) < 200).all(-1).mean() for i in range(len(data))])
    labels = np.array(data.targets)
    per_class = [ink[labels == c].mean() for c in range(3)]
    # A circle outline is longer than a triangle's at equal radius: more ink.
    assert per_class[0] > per_class[1]


def test_synthetic_set_written_to_folder_reads_back_identically(tmp_path):
    memory = make_synthetic_domains(num_classes=2, images_per_class=(3, 2), seed=1)
    folder = make_synthetic_domains(tmp_path, num_classes=2, images_per_class=(3, 2), seed=1)
    assert isinstance(folder, MultiDomainImageFolder)
    assert folder.targets == memory.targets and folder.domain_ids.tolist() == memory.domain_ids.tolist()
    for i in range(len(memory)):
        assert np.array_equal(np.asarray(folder[i][0]), np.asarray(memory[i][0]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=99), "num_classes"),
        (dict(domains=("filled",)), "two or more"),
        (dict(domains=("filled", "watercolour")), "two or more"),
        (dict(images_per_class=(4, 0)), "images_per_class"),
        (dict(image_size=4), "image_size"),
    ],
)
def test_synthetic_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_domains(**kwargs)


def test_synthetic_set_refuses_a_folder_with_files(tmp_path):
    make_synthetic_domains(tmp_path, num_classes=2, images_per_class=3)
    with pytest.raises(ValueError, match="root must be a new or empty folder"):
        make_synthetic_domains(tmp_path, num_classes=2, images_per_class=3, seed=1)


def test_synthetic_set_refuses_a_root_that_is_a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("notes")
    with pytest.raises(ValueError, match="root must be a new or empty folder, .*notes.txt' is a file"):
        make_synthetic_domains(path, num_classes=2, images_per_class=3)
    assert path.read_text() == "notes"


def test_transforms_shapes_normalisation_and_randomness():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    evaluated = eval_transform(32)(image)
    assert evaluated.shape == (3, 32, 32) and evaluated.dtype == torch.float32
    assert torch.equal(evaluated, eval_transform(32)(image))
    # Reference for the eval view: resize shorter side to 36 (=32*256/224), centre crop, ImageNet norm.
    resized = image.resize((45, 36), Image.BILINEAR)
    left, top = (45 - 32) // 2, 2
    crop = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = torch.from_numpy(((crop - mean) / std).transpose(2, 0, 1)).float()
    torch.testing.assert_close(evaluated, expected, atol=0.05, rtol=0)
    augment = moco_v2_transform(32)
    torch.manual_seed(0)
    first, second = augment(image), augment(image)
    assert first.shape == (3, 32, 32) and not torch.equal(first, second)


def batch_norm_trunk(dtype, device):
    """Linear + batch norm in train mode with running statistics unlike any batch's: eval mode shows."""
    trunk = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5)).to(device, dtype)
    trunk[1].running_mean.fill_(0.5)
    trunk[1].running_var.fill_(4.0)
    return trunk.train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("labelled", [True, False])
def test_trunk_features_equal_the_eval_mode_trunk_one_item_at_a_time(dtype, labelled, device):
    inputs = torch.randn(10, 3, dtype=dtype)
    dataset = torch.utils.data.TensorDataset(inputs, torch.arange(10)) if labelled else inputs
    trunk = batch_norm_trunk(dtype, device)
    features = trunk_features(trunk, dataset, batch_size=4)  # 4 + 4 + 2: a short last batch
    assert trunk.training  # mode restored
    assert features.shape == (10, 5) and features.dtype == dtype and features.device.type == "cpu"
    assert not features.requires_grad
    linear, norm = trunk
    expected = torch.stack([  # eval-mode batch norm written plainly, item by item
        (linear(x.to(device)) - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
        for x in inputs
    ]).detach().cpu()
    torch.testing.assert_close(features, expected)
    assert trunk[1].running_mean.eq(0.5).all()  # running statistics untouched


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_trunk_features_cast_float32_inputs_to_the_trunks_dtype(dtype):
    """Transforms make float32 images; a float64 or bfloat16 trunk takes them as the tester does."""
    inputs = torch.randn(6, 3)
    trunk = torch.nn.Linear(3, 2).to(dtype)
    features = trunk_features(trunk, torch.utils.data.TensorDataset(inputs), batch_size=4)
    assert features.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(features, trunk(inputs.to(dtype)).detach().to(features.dtype))


def test_trunk_features_leave_inputs_alone_for_a_trunk_of_mixed_dtypes():
    """A frozen float64 scale before float32 layers: no one dtype to cast to (casting to the first
    parameter's broke the float32 layers)."""
    trunk = torch.nn.Sequential(torch.nn.Linear(3, 2))
    # The container's own parameter comes first in trunk.parameters(), before the layers'.
    trunk.register_parameter("scale", torch.nn.Parameter(torch.ones((), dtype=torch.float64), requires_grad=False))
    inputs = torch.randn(4, 3)
    torch.testing.assert_close(trunk_features(trunk, inputs), trunk(inputs).detach())


def test_trunk_features_restore_each_modules_own_mode():
    trunk = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Dropout()).train()
    trunk[1].eval()  # e.g. frozen batch norm statistics inside a training model
    trunk_features(trunk, torch.randn(4, 3))
    assert [module.training for module in trunk.modules()] == [True, True, False, True]


def test_trunk_features_upcast_half_outputs_and_use_worker_processes():
    inputs = torch.randn(6, 3)
    trunk = torch.nn.Linear(3, 2)
    half = torch.nn.Sequential(trunk, Cast(torch.bfloat16))
    features = trunk_features(half, inputs, batch_size=4, num_workers=1)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, trunk(inputs).detach().to(torch.bfloat16).float())


class Cast(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)


def test_trunk_features_progress_bar_on_a_terminal_and_a_log_line_always(capsys, caplog, monkeypatch):
    """The package's one policy (the trainer's too): a bar where stderr is a terminal, none in a log file."""
    caplog.set_level(logging.INFO, logger="pml_protoot.data")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    trunk_features(torch.nn.Linear(3, 2), torch.randn(6, 3), batch_size=2, progress=True, description="eval view")
    assert "eval view" in capsys.readouterr().err
    trunk_features(torch.nn.Linear(3, 2), torch.randn(6, 3), batch_size=2)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    trunk_features(torch.nn.Linear(3, 2), torch.randn(6, 3), batch_size=2, progress=True, description="eval view")
    assert capsys.readouterr().err == ""
    assert [message.split(" in ")[0] for message in caplog.messages] == ["eval view: 6 items", "trunk features: 6 items",
                                                                        "eval view: 6 items"]


class TupleTrunk(torch.nn.Module):
    def forward(self, x):
        return x, x.sum(1)


@pytest.mark.parametrize(
    "trunk, dataset, kwargs, error, match",
    [
        (lambda x: x, torch.randn(2, 3), {}, TypeError, "trunk must be a torch.nn.Module, got function"),
        (torch.nn.Linear(3, 2), torch.randn(2, 3), {"batch_size": 0}, ValueError, "batch_size must be a positive"),
        (torch.nn.Linear(3, 2), torch.randn(2, 3), {"num_workers": -1}, ValueError, "num_workers must be a non-negative integer, got -1"),
        (torch.nn.Linear(3, 2), torch.randn(0, 3), {}, ValueError, "dataset is empty"),
        (torch.nn.Linear(3, 2), [(Image.new("RGB", (4, 4)), 0)], {}, TypeError,
         r"dataset items hold PIL images, .* build the dataset with transform=eval_transform\(\.\.\.\)"),
        (torch.nn.Linear(3, 2), [Image.new("RGB", (4, 4))], {}, TypeError, "dataset items hold PIL images"),
        # a trunk without global pooling, and one returning a tuple (e.g. features and logits)
        (torch.nn.Unflatten(1, (3, 1, 1)), torch.randn(2, 3), {}, ValueError,
         r"trunk must return \(B, F\) features \(a headless timm model .*\), got shape \(2, 3, 1, 1\)"),
        (TupleTrunk(), torch.randn(2, 3), {}, TypeError,
         r"trunk must return a \(B, F\) tensor of features .*, got a tuple"),
    ],
)
def test_trunk_features_bad_input(trunk, dataset, kwargs, error, match):
    with pytest.raises(error, match=match):
        trunk_features(trunk, dataset, **kwargs)


class CountingTrunk(torch.nn.Module):
    """Mean colour and spatial statistics as features (``pool="max"``: maxima for the means, the
    same weights computing something else); counts forward calls."""

    def __init__(self, pool="mean"):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.calls, self.pool = 0, pool

    def forward(self, images):
        self.calls += 1
        pooled = images.mean((2, 3)) if self.pool == "mean" else images.amax((2, 3))
        return torch.cat([pooled, images.std((2, 3))], 1) * self.scale

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}"


@pytest.fixture
def tiny_folder(tmp_path):
    return make_synthetic_domains(tmp_path / "data", num_classes=2, images_per_class=(3, 2), image_size=16)


def build_cache(dataset, trunk, path, *, num_views=3, image_size=16, seed=0, device="cpu", batch_size=4, num_workers=0):
    return FeatureCache(
        dataset, trunk, train_view=moco_v2_transform(image_size), eval_view=eval_transform(image_size),
        num_views=num_views, path=path, batch_size=batch_size, seed=seed, progress=False, device=device,
        num_workers=num_workers,
    )


def test_feature_cache_refuses_an_unwritable_path_before_hashing(tiny_folder, tmp_path, monkeypatch):
    """The features were extracted, then lost at the write (a hidden temporary file was named)."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(readonly))  # root writes anywhere
    monkeypatch.setattr(type(tiny_folder), "fingerprint", lambda self: pytest.fail("hashed before checking the path"))
    trunk = CountingTrunk()
    with pytest.raises(ValueError, match=f"feature cache path '.*cache.pt' cannot be created: '{readonly}' is not "
                                         "writable"):
        build_cache(tiny_folder, trunk, readonly / "sub" / "cache.pt")
    assert trunk.calls == 0
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="feature cache path '.*' cannot be created: '.*file' is not a folder"):
        build_cache(tiny_folder, trunk, tmp_path / "file" / "cache.pt")


def test_feature_cache_computes_eval_and_views_then_reloads_without_trunk(tiny_folder, tmp_path, device):
    trunk = CountingTrunk()
    trunk.train()
    cache = build_cache(tiny_folder, trunk, tmp_path / "cache.pt", device=device)
    n = len(tiny_folder)
    assert trunk.training and trunk.scale.device.type == device.type  # mode restored, moved to ``device``
    assert cache.eval_features.shape == (n, 6) and cache.view_features.shape == (3, n, 6)
    assert cache.eval_features.device.type == "cpu" and cache.eval_features.dtype == torch.float32
    # Reference: eval features written plainly, one image at a time.
    images = [eval_transform(16)(tiny_folder[i][0])[None].to(device) for i in range(n)]
    expected = torch.cat([trunk(image) for image in images]).detach().cpu()
    torch.testing.assert_close(cache.eval_features, expected)
    trunk.calls = 0
    reloaded = build_cache(tiny_folder, trunk, tmp_path / "cache.pt", device=device)
    assert trunk.calls == 0
    assert torch.equal(reloaded.view_features, cache.view_features)
    assert torch.equal(reloaded.eval_features, cache.eval_features)


def test_feature_cache_is_seeded(tiny_folder):
    a = build_cache(tiny_folder, CountingTrunk(), None, seed=1)
    b = build_cache(tiny_folder, CountingTrunk(), None, seed=1)
    c = build_cache(tiny_folder, CountingTrunk(), None, seed=2)
    assert torch.equal(a.view_features, b.view_features)
    assert not torch.equal(a.view_features, c.view_features)


@pytest.mark.parametrize("change", ["file", "transform", "weights", "architecture", "views"])
def test_feature_cache_invalidated_by_changes(change, tiny_folder, tmp_path):
    trunk = CountingTrunk()
    path = tmp_path / "cache.pt"
    original = build_cache(tiny_folder, trunk, path)
    trunk.calls = 0
    kwargs = {}
    dataset = tiny_folder
    if change == "file":
        first = tiny_folder.samples[0][0]
        Image.new("RGB", (16, 16), "red").save(first)
        os.utime(first, ns=(time.time_ns(), time.time_ns() + 10**9))
        dataset = MultiDomainImageFolder(tiny_folder.root)
    elif change == "transform":
        kwargs["image_size"] = 12
    elif change == "weights":
        with torch.no_grad():
            trunk.scale.fill_(2.0)
    elif change == "architecture":  # same state dict, other computation
        trunk = CountingTrunk(pool="max")
    else:
        kwargs["num_views"] = 2
    rebuilt = build_cache(dataset, trunk, path, **kwargs)
    assert trunk.calls > 0
    if change == "views":
        assert rebuilt.view_features.shape[0] == 2
    elif change == "weights":
        torch.testing.assert_close(rebuilt.eval_features, 2 * original.eval_features)
    else:
        assert not torch.equal(rebuilt.eval_features[0], original.eval_features[0])
    trunk.calls = 0
    build_cache(dataset, trunk, path, **kwargs)  # the rebuilt cache was saved under the new key
    assert trunk.calls == 0


def test_feature_cache_views_drawn_in_workers_are_keyed_by_the_worker_setting(tiny_folder, tmp_path):
    """Workers draw the augmented views from their own seeds: other views than in the main process, which a
    cache written without workers must not stand in for (and the other way round)."""
    trunk, path = CountingTrunk(), tmp_path / "cache.pt"
    in_main = build_cache(tiny_folder, trunk, path)
    trunk.calls = 0
    in_workers = build_cache(tiny_folder, trunk, path, num_workers=2)
    assert trunk.calls > 0 and not torch.equal(in_workers.view_features, in_main.view_features)
    torch.testing.assert_close(in_workers.eval_features, in_main.eval_features)  # the eval view is not random
    trunk.calls = 0
    assert torch.equal(build_cache(tiny_folder, trunk, path, num_workers=2).view_features, in_workers.view_features)
    assert trunk.calls == 0
    # In the main process the batch size changes nothing: such caches keep their key.
    assert torch.equal(build_cache(tiny_folder, trunk, None, batch_size=3).view_features, in_main.view_features)


def test_feature_cache_leaves_the_global_random_state_as_a_loaded_one_does(tiny_folder, tmp_path):
    """Computed or loaded from its file, the cache leaves torch's generator where it was: the same command
    trained otherwise by whether the file existed (the eval view's loader drew a seed from it)."""
    after = []
    for _ in ("computed", "loaded"):
        torch.manual_seed(0)
        build_cache(tiny_folder, CountingTrunk(), tmp_path / "cache.pt")
        after.append(torch.rand(3))
    torch.manual_seed(0)
    assert torch.equal(after[0], torch.rand(3)) and torch.equal(after[1], after[0])


def double(image):
    return T.functional.adjust_brightness(image, 2.0)


def halve(image):
    return T.functional.adjust_brightness(image, 0.5)


def test_feature_cache_tells_lambda_steps_apart_by_their_function(tiny_folder, tmp_path):
    """``T.Lambda(f)`` prints as ``Lambda()`` whatever ``f``: the key holds the function itself."""
    def cache_with(function):
        return FeatureCache(tiny_folder, trunk, train_view=moco_v2_transform(16), num_views=2, path=path,
                            eval_view=T.Compose([T.Lambda(function), eval_transform(16)]), progress=False)
    trunk, path = CountingTrunk(), tmp_path / "cache.pt"
    brighter = cache_with(double)
    trunk.calls = 0
    darker = cache_with(halve)
    assert trunk.calls > 0 and not torch.equal(darker.eval_features, brighter.eval_features)
    trunk.calls = 0
    assert torch.equal(cache_with(halve).eval_features, darker.eval_features) and trunk.calls == 0  # same: reused
    scale = 0.5
    dimmed = cache_with(lambda image: T.functional.adjust_brightness(image, scale))
    assert trunk.calls > 0
    scale, trunk.calls = 0.25, 0
    dimmer = cache_with(lambda image: T.functional.adjust_brightness(image, scale))  # the same code, another value
    assert trunk.calls > 0 and not torch.equal(dimmer.eval_features, dimmed.eval_features)
    without = moco_v2_transform(16)
    assert data_module._transform_key(without) == repr(without)  # keys of Lambda-free transforms are unchanged


def test_feature_cache_train_dataset_gives_two_different_views_and_index(tiny_folder):
    cache = build_cache(tiny_folder, CountingTrunk(), None, num_views=3)
    train = cache.train_dataset(seed=5)
    assert torch.equal(train.domain_ids, tiny_folder.domain_ids) and len(train) == len(tiny_folder)
    for index in range(len(train)):
        (view_a, view_b), returned = train[index]
        assert returned == index
        matches = [v for v in range(3) if torch.equal(cache.view_features[v, index], view_a)]
        others = [v for v in range(3) if torch.equal(cache.view_features[v, index], view_b)]
        assert matches and others and set(matches).isdisjoint(others)
    draws = [cache.train_dataset(seed=s) for s in (7, 7, 8)]
    sequences = [torch.stack([d[i % len(d)][0][0] for i in range(40)]) for d in draws]
    assert torch.equal(sequences[0], sequences[1]) and not torch.equal(sequences[0], sequences[2])


def test_cached_views_are_drawn_afresh_in_every_worker_and_epoch():
    """Workers must not replay one copy of the dataset's generator: each epoch and worker draws anew."""
    views = torch.arange(4.0)[:, None, None].expand(4, 64, 1)  # view v of every item holds the value v
    dataset = CachedTwoViewDataset(views, torch.zeros(64, dtype=torch.long), seed=0)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2)
    epochs = [torch.cat([torch.cat(pair, 1) for pair, _ in loader]) for _ in range(2)]
    assert not torch.equal(epochs[0], epochs[1])
    first_worker, second_worker = epochs[0][:8], epochs[0][8:16]  # batches alternate between workers
    assert not torch.equal(first_worker, second_worker)
    assert all(len(set(row.tolist())) == 2 for epoch in epochs for row in epoch)  # two different views


def test_cached_views_reach_spawned_workers_and_copies_keep_the_draws():
    """macOS and Windows start DataLoader workers by spawn: the dataset's generator must pickle without
    torch's shared temporary tensor (the worker died: pytorch/pytorch#146828). A copy draws as the original."""
    dataset = CachedTwoViewDataset(torch.randn(3, 8, 4), torch.tensor([0] * 4 + [1] * 4), seed=0)
    dataset[0]  # a generator that has moved on
    copy = pickle.loads(pickle.dumps(dataset))
    assert all(torch.equal(copy[i][0][0], dataset[i][0][0]) for i in range(8))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    batches = list(loader)
    assert [indices.tolist() for _, indices in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_cached_views_state_dict_replays_the_draws():
    dataset = CachedTwoViewDataset(torch.randn(4, 10, 3), torch.zeros(10, dtype=torch.long), seed=1)
    state = dataset.state_dict()
    first = [dataset[i][0][0] for i in range(10)]
    dataset.load_state_dict(state)
    assert all(torch.equal(a, dataset[i][0][0]) for i, a in enumerate(first))


def test_feature_cache_eval_dataset_keeps_labels(tiny_folder):
    cache = build_cache(tiny_folder, CountingTrunk(), None)
    for domain in tiny_folder.domains:
        indices = tiny_folder.domain_indices(domain).tolist()
        evaluation = cache.eval_dataset(domain)
        assert len(evaluation) == len(indices)
        for row, index in enumerate(indices):
            features, label = evaluation[row]
            assert int(label) == tiny_folder.targets[index]
            assert torch.equal(features, cache.eval_features[index])


def test_feature_cache_bad_input(tiny_folder):
    with pytest.raises(TypeError, match="MultiDomainDataset"):
        build_cache(torch.utils.data.TensorDataset(torch.zeros(2)), CountingTrunk(), None)
    with pytest.raises(ValueError, match="num_views"):
        build_cache(tiny_folder, CountingTrunk(), None, num_views=1)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"transform": eval_transform(16)}, ValueError, "dataset.transform must be None: the cache applies train_view and eval_view .* "
                                                       "got Compose: build the dataset with transform=None and put its "
                                                       "transform into train_view and eval_view"),
        ({"trunk": lambda images: images}, TypeError, "trunk must be a torch.nn.Module, got function"),
        ({"train_view": None}, TypeError, "train_view must be a callable transform .* got NoneType"),
        ({"eval_view": "eval"}, TypeError, "eval_view must be a callable transform .* got str"),
        ({"center_domains": "no"}, TypeError, "center_domains must be True or False, got 'no'"),
        ({"num_workers": -1}, ValueError, "num_workers must be a non-negative integer, got -1"),
        ({"seed": -1}, ValueError, "seed must be a non-negative integer, got -1"),
    ],
)
def test_feature_cache_refuses_bad_input_before_hashing_or_extracting(change, error, match):
    change = dict(change)  # the parameter is shared between runs: pop from a copy
    data = make_synthetic_domains(num_classes=2, images_per_class=2, image_size=16,
                                  transform=change.pop("transform", None))
    data.fingerprint = lambda: pytest.fail("hashed the dataset before checking the arguments")
    trunk = change.pop("trunk", CountingTrunk())
    kwargs = dict(train_view=moco_v2_transform(16), eval_view=eval_transform(16), num_views=2, progress=False)
    with pytest.raises(error, match=match):
        FeatureCache(data, trunk, **{**kwargs, **change})
    assert getattr(trunk, "calls", 0) == 0


@pytest.mark.parametrize("content", ["checkpoint", "text", "folder"])
def test_feature_cache_refuses_a_path_holding_anything_else_before_hashing(content, tiny_folder, tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    if content == "checkpoint":
        torch.save({"models": {"trunk": {}}, "epoch": 3}, path)
    elif content == "text":
        path.write_text("notes")
    else:
        path.mkdir()
    before = path.read_bytes() if path.is_file() else None
    trunk = CountingTrunk()
    # Hashing reads every image: minutes on a large dataset, to be spent only once the path is known good.
    monkeypatch.setattr(type(tiny_folder), "fingerprint", lambda self: pytest.fail("hashed before checking the path"))
    message = {"checkpoint": "holds something other than a feature cache", "text": "is not a file of tensors",
               "folder": "feature cache path .* must name a file, got a folder"}[content]
    with pytest.raises(ValueError, match=message):
        build_cache(tiny_folder, trunk, path)
    assert trunk.calls == 0
    assert (path.read_bytes() if path.is_file() else None) == before


def test_feature_cache_centres_each_domain_by_its_eval_mean():
    data = make_synthetic_domains(num_classes=2, images_per_class=(3, 2), image_size=16, seed=3)
    trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
    plain = FeatureCache(data, trunk, train_view=eval_transform(16), eval_view=eval_transform(16),
                         num_views=2, progress=False)
    centred = FeatureCache(data, trunk, train_view=eval_transform(16), eval_view=eval_transform(16),
                           num_views=2, progress=False, center_domains=True)
    for slot, domain in enumerate(data.domains):
        members = [i for i in range(len(data)) if int(data.domain_ids[i]) == slot]
        mean = sum(plain.eval_features[i] for i in members) / len(members)
        features = torch.stack([f for f, _ in centred.eval_dataset(domain)])
        expected = torch.stack([plain.eval_features[i] - mean for i in members])
        torch.testing.assert_close(features, expected)
        torch.testing.assert_close(features.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
        (view_a, view_b), index = centred.train_dataset()[members[0]]
        assert index == members[0]
        candidates = plain.view_features[:, members[0]] - mean
        for view in (view_a, view_b):
            assert any(torch.allclose(view, candidate, atol=1e-6) for candidate in candidates)
    # Centred as items are drawn: the training set holds the cache's own views, not a centred copy of them.
    assert centred.train_dataset().views.data_ptr() == centred.view_features.data_ptr()


def test_cached_two_views_subtract_their_domain_offset_as_drawn():
    views = torch.randn(3, 5, 4)
    domain_ids = torch.tensor([0, 1, 1, 0, 1])
    offsets = torch.randn(2, 4)
    shifted = CachedTwoViewDataset(views, domain_ids, seed=7, domain_offsets=offsets)
    centred_copy = CachedTwoViewDataset(views - offsets[domain_ids], domain_ids, seed=7)
    for index in range(5):  # same seed: the same views drawn, and the same arithmetic, bit for bit
        (a, b), i = shifted[index]
        (expected_a, expected_b), j = centred_copy[index]
        assert i == j == index and torch.equal(a, expected_a) and torch.equal(b, expected_b)
    with pytest.raises(TypeError, match="domain_offsets must be a .* tensor or None, got list"):
        CachedTwoViewDataset(views, domain_ids, domain_offsets=[[0.0] * 4] * 2)
    with pytest.raises(ValueError, match=r"domain_offsets must have shape \(D >= 2, 4\).*got \(1, 4\)"):
        CachedTwoViewDataset(views, domain_ids, domain_offsets=torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"got \(2, 3\)"):
        CachedTwoViewDataset(views, domain_ids, domain_offsets=torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_domain_means_equal_a_loop_and_reject_bad_slots(dtype, device):
    features = torch.randn(9, 3, dtype=dtype, device=device)
    domain_ids = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0], device=device)
    expected = torch.stack([features[domain_ids == d].mean(0) for d in range(3)])
    torch.testing.assert_close(domain_means(features, domain_ids), expected)
    with pytest.raises(ValueError, match="domain_ids"):
        domain_means(features, torch.tensor([0, 2] * 4 + [2]))  # slot 1 empty
    with pytest.raises(ValueError, match="domain_ids"):
        domain_means(features, domain_ids[:5])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_domain_means_of_half_precision_features_do_not_overflow(dtype, device):
    """70,000 rows of a domain: their float16 sum and count pass 65,504 (the means were NaN)."""
    generator = torch.Generator().manual_seed(0)
    features = (1.5 + torch.rand(70_001, 2, generator=generator)).to(dtype)
    domain_ids = torch.zeros(70_001, dtype=torch.long)
    domain_ids[-1] = 1
    means = domain_means(features.to(device), domain_ids.to(device))
    assert means.dtype == dtype
    expected = torch.stack([features[:-1].double().mean(0), features[-1].double()])
    torch.testing.assert_close(means.cpu().double(), expected, rtol=0, atol=float(torch.finfo(dtype).eps) * 2)


@pytest.mark.parametrize(
    "features, domain_ids, error, match",
    [
        ([[0.0], [1.0]], [0, 0], TypeError, "features must be a torch.Tensor, got list"),
        (np.zeros((2, 1)), [0, 0], TypeError, "features must be a torch.Tensor, got ndarray"),
        (torch.zeros(2), [0, 0], ValueError, r"features must have shape \(N, D\), got \(2,\)"),
        (torch.zeros(3, 2), [0, -1, 0], ValueError, r"domain_ids must be domain slots >= 0, got \[-1\]"),
    ],
)
def test_domain_means_bad_input(features, domain_ids, error, match):
    with pytest.raises(error, match=match):
        domain_means(features, domain_ids)


def test_in_memory_images_are_rgb_and_fingerprinted_with_their_size():
    grey, wide, tall = Image.new("L", (4, 2), 7), Image.new("RGB", (4, 2), "red"), Image.new("RGB", (2, 4), "red")
    data = InMemoryMultiDomainDataset({("a", "x"): [grey], ("b", "x"): [wide]}, ["a", "b"], ["x"])
    assert data[0][0].mode == "RGB" and data[0][0].getpixel((0, 0)) == (7, 7, 7)
    other = InMemoryMultiDomainDataset({("a", "x"): [grey], ("b", "x"): [tall]}, ["a", "b"], ["x"])
    assert data.fingerprint() != other.fingerprint()


def test_in_memory_palette_images_are_fingerprinted_by_their_colours():
    """A palette image's bytes are indices: two images of other colours share them."""
    def palette_image(rgb):
        image = Image.new("P", (4, 4), 0)
        image.putpalette(list(rgb) * 256)
        return image

    red, blue = (InMemoryMultiDomainDataset({("a", "x"): [palette_image(rgb)], ("b", "x"): [palette_image(rgb)]},
                                            ["a", "b"], ["x"]) for rgb in ((255, 0, 0), (0, 0, 255)))
    assert red[0][0].getpixel((0, 0)) == (255, 0, 0) and blue[0][0].getpixel((0, 0)) == (0, 0, 255)
    assert red.fingerprint() != blue.fingerprint()


def test_in_memory_images_under_an_unknown_domain_or_class_are_refused():
    blank = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match=r"keys outside domains x classes.*\('a', 'dog'\)"):
        InMemoryMultiDomainDataset({("a", "x"): [blank], ("a", "dog"): [blank]}, ["a", "b"], ["x"])


def test_a_stale_feature_cache_is_freed_before_its_replacement_is_extracted(tiny_folder, tmp_path, monkeypatch):
    """On a large dataset the stale cache is as big as the new one: both at once doubled the peak."""
    import gc
    import weakref

    import pml_protoot.data as data_module

    path = tmp_path / "cache.pt"
    build_cache(tiny_folder, CountingTrunk(), path, seed=0)
    loaded, alive_at_extraction = [], []
    load_saved = data_module.load_saved
    monkeypatch.setattr(data_module, "load_saved", lambda *args: loaded.append(result := load_saved(*args)) or result)
    compute = FeatureCache._compute

    def checking_compute(self, *args):
        references = [weakref.ref(stored["views"]) for stored in loaded]
        loaded.clear()
        gc.collect()
        alive_at_extraction.extend(reference() is not None for reference in references)
        return compute(self, *args)

    monkeypatch.setattr(FeatureCache, "_compute", checking_compute)
    build_cache(tiny_folder, CountingTrunk(), path, seed=1)  # another seed: the stored cache is stale
    assert alive_at_extraction == [False]


class DrawsFromEveryGenerator(torch.utils.data.Dataset):
    """Items drawn from torch's, Python's and NumPy's global generators and from a generator of its own
    (with a ``state_dict``, as CachedTwoViewDataset has); ``opened`` records where it opened its "file"."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(1)
        self.opened_in = None

    def __len__(self):
        return 3

    def __getitem__(self, index):
        import random

        self.opened_in = self.opened_in or os.getpid()  # a lazily opened file handle, as h5py datasets do
        own = torch.rand(1, generator=self.generator)
        return torch.rand(1), random.random(), np.random.rand(), own

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


@pytest.mark.parametrize("wrap", [lambda d: d, lambda d: torch.utils.data.Subset(d, [0, 1]),
                                  lambda d: torch.utils.data.ConcatDataset([d, d])], ids=["plain", "subset", "concat"])
def test_first_item_read_here_leaves_every_random_state_as_it_was(wrap):
    """The trainer and trunk_features read item 0 to check its layout; the draws of training must not move."""
    import random

    dataset, twin = DrawsFromEveryGenerator(), DrawsFromEveryGenerator()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    peeked = first_item(wrap(dataset))
    after_peek = dataset[0]
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    first = twin[0]
    assert peeked == first and after_peek == first  # the same draws as a dataset never read


def test_first_item_with_workers_is_read_in_a_worker_process():
    """A dataset that opens its files lazily must not hand this process's handle to the loader's workers."""
    dataset = DrawsFromEveryGenerator()
    generator_state = dataset.generator.get_state()
    torch.manual_seed(0)
    expected_global = torch.get_rng_state()
    item = first_item(dataset, num_workers=2)
    assert len(item) == 4 and dataset.opened_in is None  # opened in the worker, not here
    assert torch.equal(dataset.generator.get_state(), generator_state)
    assert torch.equal(torch.get_rng_state(), expected_global)  # the loader's seed draw is undone


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(3))

    def __len__(self):
        return 3


def test_first_item_of_what_cannot_be_indexed_or_is_empty_is_none():
    assert first_item(Stream()) is None and first_item([]) is None and first_item(iter([1])) is None
    assert first_item([(1, 2)]) == (1, 2)


@pytest.mark.parametrize("images, shown", [
    ([Image.new("RGB", (4, 4))] * 2, "got a list$"),
    ({"a": [Image.new("RGB", (4, 4))]}, "got the key 'a'"),
    ({("a", "x"): Image.new("RGB", (4, 4))}, r"got a Image under \('a', 'x'\)"),
    ({("a", "x"): [torch.zeros(3, 4, 4)]}, r"got a Tensor in the list under \('a', 'x'\)"),
])
def test_in_memory_dataset_names_the_layout_images_must_have(images, shown):
    """A list of images gave "unhashable type: 'Image'" from inside the constructor."""
    with pytest.raises(TypeError, match=r"images must be a dict \{\(domain, class_name\): \[PIL images\]\}, " + shown):
        InMemoryMultiDomainDataset(images, ["a", "b"], ["x"])
