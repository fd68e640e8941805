"""CrossDomainTester: pairs, one embedding pass per domain, PML hook compatibility, errors."""
import json
import math
import re
import sys
import warnings

import pytest
import torch
from pytorch_metric_learning.utils.logging_presets import HookContainer

from pml_protoot.accuracy import PrecisionAtKCalculator
import pml_protoot.testers as testers_module
from pml_protoot.testers import CrossDomainTester


class CountingTrunk(torch.nn.Module):
    """Linear trunk that counts how many images it has embedded."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = torch.nn.Linear(dim_in, dim_out)
        self.images_seen = 0

    def forward(self, x):
        self.images_seen += len(x)
        return self.linear(x)


def domain_datasets(sizes, dim=6, num_classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    datasets = {}
    for name, size in sizes.items():
        images = torch.randn(size, dim, generator=generator)
        labels = torch.randperm(size, generator=generator) % num_classes  # every class in every domain
        datasets[name] = torch.utils.data.TensorDataset(images, labels)
    return datasets


def make_tester(**kwargs):
    calc = PrecisionAtKCalculator(k_values=(1, 5), exclude=("NMI", "AMI"), device=torch.device("cpu"))
    return CrossDomainTester(accuracy_calculator=calc, batch_size=7, dataloader_num_workers=0, **kwargs)


def test_three_domains_give_six_pairs_and_embed_each_once(device):
    sizes = {"art": 11, "photo": 9, "sketch": 13}
    datasets = domain_datasets(sizes)
    trunk = CountingTrunk(6, 4).to(device)
    tester = make_tester()
    results = tester.test(datasets, 3, trunk)
    expected_pairs = {f"{a}->{b}" for a in sizes for b in sizes if a != b}
    assert set(results) == expected_pairs | {"mean"}
    assert trunk.images_seen == sum(sizes.values())
    assert all(values["epoch"] == 3 for values in results.values())
    json.dumps(results)  # plain Python numbers only


def test_pair_results_equal_calculator_on_model_embeddings(device):
    datasets = domain_datasets({"photo": 10, "sketch": 12})
    trunk = CountingTrunk(6, 4).to(device)
    tester = make_tester()
    results = tester.test(datasets, 0, trunk)
    with torch.no_grad():
        embeddings = {name: trunk(data.tensors[0].to(device)).cpu() for name, data in datasets.items()}
    labels = {name: data.tensors[1] for name, data in datasets.items()}
    direct = tester.accuracy_calculator.get_accuracy(embeddings["photo"], labels["photo"], embeddings["sketch"], labels["sketch"])
    for metric, value in direct.items():
        assert results["photo->sketch"][metric] == pytest.approx(value, rel=1e-5)
    for metric in direct:
        mean = (results["photo->sketch"][metric] + results["sketch->photo"][metric]) / 2
        assert results["mean"][metric] == pytest.approx(mean, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_evaluate_matches_test_shape_and_restricts_pairs(dtype):
    generator = torch.Generator().manual_seed(1)
    embeddings = {name: torch.randn(8, 4, generator=generator, dtype=dtype) for name in ("a", "b", "c")}
    labels = {name: torch.randint(0, 2, (8,), generator=generator) for name in ("a", "b", "c")}
    tester = make_tester()
    results = tester.evaluate(embeddings, labels, pairs=[("a", "c")])
    assert set(results) == {"a->c", "mean"}
    assert results["mean"] == results["a->c"]
    expected = tester.accuracy_calculator.get_accuracy(embeddings["a"], labels["a"], embeddings["c"], labels["c"])
    assert results["a->c"] == pytest.approx(expected)


def test_pairs_restrict_embedding_to_named_domains():
    datasets = domain_datasets({"art": 5, "photo": 6, "sketch": 7})
    trunk = CountingTrunk(6, 4)
    results = make_tester().test(datasets, 0, trunk, pairs=[("photo", "sketch")])
    assert set(results) == {"photo->sketch", "mean"}
    assert trunk.images_seen == 6 + 7


def test_summary_table_lists_pairs_and_metrics():
    datasets = domain_datasets({"photo": 6, "sketch": 7})
    tester = make_tester()
    tester.test(datasets, 0, CountingTrunk(6, 4))
    table = tester.summary_table()
    lines = table.splitlines()
    assert lines[0].split()[0] == "pair" and "precision_at_5" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["photo->sketch", "sketch->photo", "mean"]
    assert float(lines[-1].split()[lines[0].split().index("precision_at_1")]) == pytest.approx(
        100 * tester.results["mean"]["precision_at_1"], abs=0.005
    )


class MemoryRecordKeeper:
    """The part of record-keeper's interface HookContainer.end_of_testing_hook uses."""

    def __init__(self):
        self.records, self.hash_map = [], {}

    def update_records(self, record, epoch, parent_name=None, **kwargs):
        self.records.append((parent_name, epoch, dict(record)))

    def table_exists(self, name):
        return False


def test_hook_container_reads_mean_primary_metric():
    hooks = HookContainer(MemoryRecordKeeper(), primary_metric="precision_at_5", validation_split_name="mean")
    tester = make_tester(end_of_testing_hook=hooks.end_of_testing_hook)
    tester.test(domain_datasets({"photo": 6, "sketch": 7}), 2, CountingTrunk(6, 4))
    assert hooks.get_curr_primary_metric(tester, "mean") == tester.all_accuracies["mean"]["precision_at_5"]
    best = [record for name, _, record in hooks.record_keeper.records if "best_epoch" in record]
    assert len(best) == 3 and all(record["best_epoch"] == 2 for record in best)


@pytest.mark.parametrize("separator, valid_sql", [("->", False), ("_to_", True)])
def test_pair_separator_makes_record_keeper_table_names_valid_sql(separator, valid_sql):
    """record-keeper creates a SQLite table per HookContainer group name, unquoted, as here."""
    import sqlite3

    hooks = HookContainer(MemoryRecordKeeper(), primary_metric="precision_at_5", validation_split_name="mean")
    tester = make_tester(end_of_testing_hook=hooks.end_of_testing_hook, pair_separator=separator)
    results = tester.test(domain_datasets({"Art": 6, "Real": 7}), 1, CountingTrunk(6, 4))
    assert sorted(results) == sorted(["mean", f"Art{separator}Real", f"Real{separator}Art"])
    connection = sqlite3.connect(":memory:")
    for key in results:
        statement = f"CREATE TABLE {hooks.record_group_name(tester, key)} (epoch INTEGER)"
        if valid_sql or key == "mean":
            connection.execute(statement)
        else:
            with pytest.raises(sqlite3.OperationalError):
                connection.execute(statement)


def test_run_tester_separately_evaluates_without_the_skip_check():
    hooks = HookContainer(MemoryRecordKeeper(), primary_metric="precision_at_5", validation_split_name="mean")
    tester = make_tester(end_of_testing_hook=hooks.end_of_testing_hook)
    datasets = domain_datasets({"photo": 6, "sketch": 7})
    assert hooks.run_tester_separately(tester, datasets, 1, CountingTrunk(6, 4), None, skip_eval_if_already_done=False)
    assert tester.all_accuracies["mean"]["epoch"] == 1


def test_a_float64_model_is_scored_in_float64_as_evaluate_scores_it():
    # Cosines 1 - 5.0e-11 (same class) and 1 - 6.05e-11 (other class, listed first): equal in float32,
    # where the tie goes to the first item.
    queries = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    gallery = torch.tensor([[1.0, 0.0, 1.1e-5], [1.0, 1e-5, 0.0]], dtype=torch.float64)
    query_labels, gallery_labels = torch.tensor([0]), torch.tensor([1, 0])
    datasets = {"photo": torch.utils.data.TensorDataset(queries, query_labels),
                "sketch": torch.utils.data.TensorDataset(gallery, gallery_labels)}
    tester = make_tester()
    tested = tester.test(datasets, 0, torch.nn.Identity(), pairs=[("photo", "sketch")])
    evaluated = tester.evaluate({"photo": queries, "sketch": gallery}, {"photo": query_labels, "sketch": gallery_labels},
                                pairs=[("photo", "sketch")])
    assert tested["photo->sketch"]["precision_at_1"] == evaluated["photo->sketch"]["precision_at_1"] == 1.0


def test_a_trunk_without_parameters_feeds_the_embedders_device(device):
    """Cached features: ``nn.Identity()`` as the trunk, the head on the GPU (inputs went to the CPU)."""
    datasets = domain_datasets({"photo": 10, "sketch": 12})
    head = CountingTrunk(6, 4).to(device)
    tester = make_tester()
    results = tester.test(datasets, 0, torch.nn.Identity(), head)
    assert tester.data_device == head.linear.weight.device
    with torch.no_grad():
        embeddings = {name: head(data.tensors[0].to(device)) for name, data in datasets.items()}
    expected = tester.evaluate(embeddings, {name: data.tensors[1] for name, data in datasets.items()})
    assert {key: results[key] for key in expected} == {key: {"epoch": 0, **value} for key, value in expected.items()}
    meta_head = torch.nn.Linear(3, 2, device="meta")  # where a parameter-free trunk's inputs go, on any machine
    assert testers_module._input_device(torch.nn.Identity(), meta_head) == torch.device("meta")
    assert testers_module._input_device(torch.nn.Identity(), torch.nn.Identity()) == torch.device("cpu")


def test_domains_of_other_embedding_widths_are_refused_naming_each_width():
    tester, y = make_tester(), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"every domain's embeddings must have the same width D, got "
                                         r"\{'photo': 4, 'sketch': 8\}"):
        tester.evaluate({"photo": torch.randn(4, 4), "sketch": torch.randn(4, 8)}, {"photo": y, "sketch": y})


@pytest.mark.parametrize("calculator, says", [
    (PrecisionAtKCalculator, r"must be an instance, e.g. PrecisionAtKCalculator\(\), got the class"),
    ("precision_at_1", "must be an AccuracyCalculator .*, got str 'precision_at_1'"),
])
def test_an_accuracy_calculator_that_cannot_score_is_refused_at_construction(calculator, says):
    with pytest.raises(TypeError, match=f"accuracy_calculator {says}"):
        CrossDomainTester(accuracy_calculator=calculator)


def test_class_names_from_a_collate_fn_of_your_own_are_refused_in_words():
    class Named(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.randn(3), ["cat", "dog"][index % 2]

    with pytest.raises(TypeError, match=r"dataset batches must have integer class labels, got tuple \('cat', 'dog'"):
        make_tester().test({"a": Named(), "b": Named()}, 0, torch.nn.Linear(3, 2),
                           collate_fn=torch.utils.data.default_collate)


def test_bad_input():
    tester = make_tester()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"labels_by_domain\['b'\] must have one label per 'b' embedding"):
        tester.evaluate({"a": x, "b": x}, {"a": y, "b": y[:3]})
    with pytest.raises(ValueError, match=r"labels_by_domain\['a'\] must be 1-D"):
        tester.evaluate({"a": x, "b": x}, {"a": y[:, None], "b": y})
    with pytest.raises(ValueError, match="unknown domain"):
        tester.evaluate({"a": x, "b": x}, {"a": y, "b": y}, pairs=[("a", "photo")])
    with pytest.raises(ValueError, match="two different domains"):
        tester.evaluate({"a": x, "b": x}, {"a": y, "b": y}, pairs=[("a", "a")])
    with pytest.raises(ValueError, match="same domains"):
        tester.evaluate({"a": x, "b": x}, {"a": y})
    with pytest.raises(ValueError, match="at least two domains"):
        tester.evaluate({"a": x}, {"a": y})
    with pytest.raises(ValueError, match=r"embeddings_by_domain\['b'\] must hold at least one"):
        tester.evaluate({"a": x, "b": x[:0]}, {"a": y, "b": y[:0]})
    with pytest.raises(ValueError, match="got the string 'a->b'"):
        tester.evaluate({"a": x, "b": x}, {"a": y, "b": y}, pairs="a->b")
    datasets = domain_datasets({"photo": 3, "sketch": 0})
    with pytest.raises(ValueError, match=r"dataset_dict\['sketch'\] must hold at least one item"):
        tester.test(datasets, 0, CountingTrunk(6, 4))
    with pytest.raises(ValueError, match="return_per_class=False"):
        CrossDomainTester(PrecisionAtKCalculator(return_per_class=True))
    with pytest.raises(ValueError, match="pair_separator must be a non-empty string, got ''"):
        CrossDomainTester(pair_separator="")
    # PrecisionAtKCalculator ranks by cosine whatever the tester passes: with ranking metrics only the flag
    # would be ignored; NMI (the default calculator has it) clusters the embeddings as given.
    rankings_only = PrecisionAtKCalculator(include=("precision_at_1", "r_precision"))
    with pytest.raises(ValueError, match="normalize_embeddings=False would change nothing: PrecisionAtKCalculator"):
        CrossDomainTester(rankings_only, normalize_embeddings=False)
    CrossDomainTester(normalize_embeddings=False)
    for flag in ("autocast", "normalize_embeddings", "use_trunk_output"):  # "False" acted as True
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'False'"):
            CrossDomainTester(**{flag: "False"})
    for dtype in ("float32", torch.int64):  # a string failed in .to() deep in test(); int64 truncated the inputs
        with pytest.raises(TypeError, match=f"dtype must be a floating torch.dtype .* or None, got {dtype!r}"):
            CrossDomainTester(dtype=dtype)


def test_items_that_are_not_image_label_pairs_are_refused_saying_what_they_hold():
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 0, 1])
    triples = {name: torch.utils.data.TensorDataset(x, y, y) for name in ("photo", "sketch")}
    trunk = CountingTrunk(6, 4)
    with pytest.raises(ValueError, match=r"dataset_dict\['photo'\] items must be \(image, class_label\) tuples, "
                                         r"got a tuple of length 3"):
        make_tester().test(triples, 0, trunk)
    assert trunk.images_seen == 0  # refused before embedding
    # Items are checked in their batches too, where a collate_fn makes them: the checks of the items are the
    # default collate's.
    with pytest.raises(ValueError, match=r"dataset items must be \(image, class_label\) tuples, got a list of length 3"):
        make_tester().test(triples, 0, trunk, collate_fn=torch.utils.data.default_collate)


class MappedItems(torch.utils.data.Dataset):
    """``dataset``'s items through ``change``."""

    def __init__(self, dataset, change):
        self.dataset, self.change = dataset, change

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.change(*self.dataset[index])


@pytest.mark.parametrize("change, error", [
    # a training set's ((query, key), index) items: failed in the trunk's .to() after the loader started
    (lambda x, y: ((x, x), y), r"must be \(image, class_label\) with one image, got 2 \(a training dataset's views\?\)"),
    # the pair swapped: failed in the trunk, naming no dataset
    (lambda x, y: (int(y), x), r"must be \(image, class_label\) with a tensor image first, got int \d first"),
    # class names: a NumPy AxisError from PML's label mapping
    (lambda x, y: (x, "dog"), r"must have integer class labels, got str 'dog': map class names to integers"),
    (lambda x, y: (x, [int(y), "dog"]), r"must have integer class labels, got list \[\d, 'dog'\]:"),
], ids=["two_views", "swapped", "class_name", "class_name_in_a_hierarchy"])
def test_items_of_another_kind_are_refused_before_embedding_naming_the_domain(change, error):
    datasets = {name: MappedItems(dataset, change) for name, dataset in domain_datasets({"photo": 3, "sketch": 4}).items()}
    trunk = CountingTrunk(6, 4)
    with pytest.raises(TypeError, match=r"dataset_dict\['photo'\] items " + error):
        make_tester().test(datasets, 0, trunk)
    assert trunk.images_seen == 0


@pytest.mark.parametrize("change", [
    lambda x, y: (x.numpy(), y.numpy()),  # arrays
    lambda x, y: (x, [y, y]),  # PML's label hierarchy: one label per level
    lambda x, y: (x, int(y)),
], ids=["arrays", "hierarchy", "python_int"])
def test_items_of_every_accepted_kind_pass_the_check_and_score_alike(change):
    datasets = domain_datasets({"photo": 3, "sketch": 4})
    mapped = {name: MappedItems(dataset, change) for name, dataset in datasets.items()}
    trunk = CountingTrunk(6, 4)
    assert make_tester().test(mapped, 0, trunk) == make_tester().test(datasets, 0, trunk)


def test_a_dataset_of_pil_images_is_refused_before_embedding_with_the_fix():
    """A dataset built without a transform holds PIL images, which torch's default collate cannot batch: its
    TypeError named neither the domain nor the fix."""
    from torchvision.transforms.functional import pil_to_tensor

    from pml_protoot.data import eval_transform, make_synthetic_domains

    data = make_synthetic_domains(num_classes=2, images_per_class=2, image_size=16)
    trunk = torch.nn.Sequential(torch.nn.Flatten(), CountingTrunk(3 * 16 * 16, 4))
    domains = {d: data.subset(d) for d in data.domains}
    with pytest.raises(TypeError, match=r"dataset_dict\['filled'\] items hold PIL images, which torch's default "
                                        r"collate cannot batch: .*build the dataset with transform=eval_transform\(\.\.\.\)"):
        make_tester().test(domains, 0, trunk)
    assert trunk[1].images_seen == 0

    def to_tensors(batch):  # a collate_fn of one's own may take PIL images: not refused
        return torch.stack([pil_to_tensor(image).float() for image, _ in batch]), torch.tensor([y for _, y in batch])

    assert "mean" in make_tester().test(domains, 0, trunk, collate_fn=to_tensors)
    data.transform = eval_transform(16)  # as the message says
    assert "mean" in make_tester().test(domains, 0, trunk)


def test_a_model_giving_nan_is_named_as_the_model():
    class NanTrunk(torch.nn.Module):
        def forward(self, images):
            return torch.full((len(images), 4), float("nan"))

    with pytest.raises(ValueError, match=r"the model's embeddings of dataset_dict\['photo'\] must be finite"):
        make_tester().test(domain_datasets({"photo": 3, "sketch": 4}), 0, NanTrunk())


def test_the_end_of_testing_hook_reads_embeddings_and_labels_as_pml_leaves_them():
    """PML's BaseTester sets tester.embeddings_and_labels ({split: (scored embeddings, (N, 1) labels)})
    for the hook and deletes it after; hooks that plot or export embeddings read it."""
    datasets = domain_datasets({"photo": 5, "sketch": 6})
    trunk = CountingTrunk(6, 4)
    seen = {}

    def hook(tester):
        seen.update(tester.embeddings_and_labels)

    tester = make_tester(end_of_testing_hook=hook)
    tester.test(datasets, 0, trunk)
    assert not hasattr(tester, "embeddings_and_labels")
    with torch.no_grad():
        for name, data in datasets.items():
            embeddings, labels = seen[name]
            torch.testing.assert_close(embeddings, torch.nn.functional.normalize(trunk(data.tensors[0]), dim=1))
            assert torch.equal(labels, data.tensors[1][:, None])


@pytest.mark.parametrize("labels", [[0.5, 1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0, 0.0]], ids=["fractional", "whole"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_test_refuses_float_labels_as_evaluate_does(labels, dtype):
    """A cast would turn 0.5 into class 0; whole-valued floats are refused too, as evaluate refuses them."""
    datasets = domain_datasets({"photo": 5, "sketch": 6})
    float_labels = torch.tensor(labels, dtype=dtype)
    datasets["photo"] = torch.utils.data.TensorDataset(datasets["photo"].tensors[0], float_labels)
    tester = make_tester()
    trunk = CountingTrunk(6, 4)
    refused = re.escape(f"dataset_dict['photo'] labels must hold integers, got dtype {dtype}")
    with pytest.raises(TypeError, match=refused):
        tester.test(datasets, 0, trunk)
    assert trunk.images_seen == 5  # refused once the domain is embedded, before any scoring
    embeddings = {"photo": torch.randn(5, 4), "sketch": torch.randn(6, 4)}
    with pytest.raises(TypeError, match=re.escape(f"labels_by_domain['photo'] must hold integers, got dtype {dtype}")):
        tester.evaluate(embeddings, {"photo": float_labels, "sketch": datasets["sketch"].tensors[1]})


def test_evaluate_detaches_embeddings_that_require_grad():
    datasets = domain_datasets({"photo": 10, "sketch": 12}, seed=4)
    trunk = CountingTrunk(6, 4)
    embeddings = {
        "photo": trunk(datasets["photo"].tensors[0]),  # a model's output, not a leaf
        "sketch": torch.randn(12, 4, generator=torch.Generator().manual_seed(5)).requires_grad_(),  # a leaf
    }
    labels = {name: data.tensors[1] for name, data in datasets.items()}
    tester = make_tester()
    results = tester.evaluate(embeddings, labels)
    # The expectation: the calculator on the detached, normalised embeddings (what test() scores).
    plain = {name: torch.nn.functional.normalize(values.detach(), dim=1) for name, values in embeddings.items()}
    for query, gallery in (("photo", "sketch"), ("sketch", "photo")):
        expected = tester.accuracy_calculator.get_accuracy(plain[query], labels[query], plain[gallery], labels[gallery])
        assert results[f"{query}->{gallery}"] == pytest.approx(expected, rel=1e-12)
    assert trunk.linear.weight.grad is None and embeddings["sketch"].grad is None


def test_evaluate_normalises_as_test_does_for_any_calculator():
    """With a PML calculator on Euclidean distance, evaluate(E) scores what test() of a model
    giving E scores: both L2-normalise (normalize_embeddings=True), or neither does."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    datasets = domain_datasets({"photo": 10, "sketch": 12}, seed=3)
    scale = torch.nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        scale.weight.copy_(torch.diag(torch.tensor([9.0, 0.1, 5.0, 0.2, 1.0, 3.0])))
    embeddings = {name: scale(data.tensors[0]).detach() for name, data in datasets.items()}
    labels = {name: data.tensors[1] for name, data in datasets.items()}
    for normalize in (True, False):
        calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k=5, device=torch.device("cpu"))
        tester = CrossDomainTester(calc, batch_size=4, dataloader_num_workers=0, normalize_embeddings=normalize)
        tested = tester.test(datasets, 0, scale)
        evaluated = tester.evaluate(embeddings, labels)
        for key, values in evaluated.items():
            assert {k: v for k, v in tested[key].items() if k != "epoch"} == pytest.approx(values, rel=1e-6), key


def test_summary_table_columns_fit_values_wider_than_their_header():
    tester = make_tester()
    results = {"a->b": {"nmi": -0.5, "precision_at_1": 1.0}, "mean": {"nmi": -0.5, "precision_at_1": 1.0}}
    lines = tester.summary_table(results).splitlines()
    assert len({len(line) for line in lines}) == 1  # every row as wide as the header: columns line up
    assert lines[1].split() == ["a->b", "-50.00", "100.00"]


@pytest.mark.parametrize("progress", [True, False])
def test_embeddings_follow_dataset_order_and_progress_switch(device, capsys, progress, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars are drawn on a terminal only
    datasets = domain_datasets({"photo": 10, "sketch": 12})
    trunk = CountingTrunk(6, 4).to(device)
    tester = make_tester(progress=progress)
    embeddings, labels = tester._embed_domain(datasets["sketch"], trunk, torch.nn.Identity(), None)
    with torch.no_grad():
        expected = trunk(datasets["sketch"].tensors[0].to(device))  # unnormalised: evaluate() normalises, once
    torch.testing.assert_close(embeddings, expected)
    assert torch.equal(labels.cpu(), datasets["sketch"].tensors[1])
    assert ("embedding" in capsys.readouterr().err) == progress


def scores_without_epoch(results):
    return {key: {k: v for k, v in values.items() if k != "epoch"} for key, values in results.items()}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_a_model_of_any_float_dtype_is_fed_its_own_dtype(dtype, autocast):
    """float32 data into a float64/bf16/fp16 model: test() casts it to the model's dtype (under autocast
    too: autocast leaves float64 alone), as the reference here embeds by hand, and scores the outputs
    as evaluate() scores them."""
    datasets = domain_datasets({"photo": 30, "sketch": 40}, seed=6)
    trunk = torch.nn.Linear(6, 8).to(dtype)
    embedder = torch.nn.Linear(8, 4).to(dtype)
    tester = make_tester(autocast=autocast)
    tested = tester.test(datasets, 0, trunk, embedder)
    with torch.no_grad(), torch.autocast("cpu", enabled=autocast):
        embeddings = {name: embedder(trunk(data.tensors[0].to(dtype))) for name, data in datasets.items()}
    # CPU autocast runs in bfloat16, but leaves float64 alone.
    expected_dtype = torch.bfloat16 if autocast and dtype != torch.float64 else dtype
    assert {values.dtype for values in embeddings.values()} == {expected_dtype}
    labels = {name: data.tensors[1] for name, data in datasets.items()}
    assert scores_without_epoch(tested) == tester.evaluate(embeddings, labels)


def test_dtype_argument_casts_float_inputs_as_pml_does():
    """PML's ``dtype``: float32 data cast to float64 for a float64 model; a bf16 trunk's outputs cast to
    its float32 head's dtype."""
    datasets = domain_datasets({"photo": 12, "sketch": 15}, seed=7)
    trunk = torch.nn.Linear(6, 4).double()
    tester = make_tester(dtype=torch.float64)
    assert tester.dtype == torch.float64
    tested = tester.test(datasets, 0, trunk)
    with torch.no_grad():
        embeddings = {name: trunk(data.tensors[0].double()) for name, data in datasets.items()}
    labels = {name: data.tensors[1] for name, data in datasets.items()}
    assert scores_without_epoch(tested) == tester.evaluate(embeddings, labels)
    head = torch.nn.Linear(4, 3)
    tested = make_tester().test(datasets, 0, trunk.bfloat16(), head)
    with torch.no_grad():
        embeddings = {name: head(trunk(data.tensors[0].bfloat16()).float()) for name, data in datasets.items()}
    assert scores_without_epoch(tested) == tester.evaluate(embeddings, labels)


class UInt8Trunk(torch.nn.Module):
    """A float64 model that takes uint8 images and scales them itself, as MoCoV2Augment does."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 4).double()

    def forward(self, images):
        assert images.dtype == torch.uint8, images.dtype
        return self.linear(images.double() / 255)


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_uint8_inputs_reach_the_model_uncast(dtype):
    generator = torch.Generator().manual_seed(8)
    datasets = {name: torch.utils.data.TensorDataset(torch.randint(0, 256, (size, 6), generator=generator,
                                                                   dtype=torch.uint8), torch.arange(size) % 3)
                for name, size in (("photo", 9), ("sketch", 11))}
    trunk = UInt8Trunk()
    tester = make_tester(dtype=dtype)
    tested = tester.test(datasets, 0, trunk)
    with torch.no_grad():
        embeddings = {name: trunk(data.tensors[0]) for name, data in datasets.items()}
    labels = {name: data.tensors[1] for name, data in datasets.items()}
    assert scores_without_epoch(tested) == tester.evaluate(embeddings, labels)


def test_evaluate_of_bf16_outputs_scores_exactly_what_test_scores():
    """bf16 outputs are upcast before they are normalised, in evaluate() as in test(): normalising in
    bf16 rounds the cosines a second time, to 2**-8, and ties and swaps neighbours."""
    datasets = domain_datasets({"photo": 300, "sketch": 400}, dim=16, num_classes=10, seed=9)
    trunk = torch.nn.Linear(16, 8).bfloat16()
    tester = make_tester(autocast=True)
    tested = scores_without_epoch(tester.test(datasets, 0, trunk))
    with torch.no_grad(), torch.autocast("cpu"):
        outputs = {name: trunk(data.tensors[0]) for name, data in datasets.items()}
    assert {values.dtype for values in outputs.values()} == {torch.bfloat16}
    labels = {name: data.tensors[1] for name, data in datasets.items()}
    # To float32 summation order (the full-ranking mAP sums in blocks); the defect moved P@5 by 7e-4.
    evaluated = tester.evaluate(outputs, labels)
    assert evaluated.keys() == tested.keys()
    for pair, metrics in tested.items():
        assert evaluated[pair] == pytest.approx(metrics, rel=0, abs=1e-6), pair
    # The reference: the calculator on the outputs upcast to float32, then normalised.
    unit = {name: torch.nn.functional.normalize(values.float(), dim=1) for name, values in outputs.items()}
    expected = tester.accuracy_calculator.get_accuracy(unit["photo"], labels["photo"], unit["sketch"], labels["sketch"])
    assert tested["photo->sketch"] == pytest.approx(expected, rel=0, abs=1e-6)


@pytest.mark.parametrize("references", [["sketch"], ("sketch", "art")])
def test_pml_splits_to_eval_form_is_refused_with_the_pairs_to_write(references):
    datasets = domain_datasets({"art": 5, "photo": 6, "sketch": 7})
    trunk = CountingTrunk(6, 4)
    tester = make_tester()
    refused = re.escape(
        f"pairs must hold (query_domain, gallery_domain) name pairs, got ('photo', {references!r}): PML's "
        "(query_split, [reference_splits]) form is not supported"
    )
    suggestion = re.escape(f"write {[('photo', name) for name in references]!r}")
    with pytest.raises(ValueError, match=f"{refused}.*{suggestion}"):
        tester.test(datasets, 1, trunk, None, [("photo", references)])
    assert trunk.images_seen == 0
    embeddings = {name: torch.randn(len(data), 4) for name, data in datasets.items()}
    labels = {name: data.tensors[1] for name, data in datasets.items()}
    with pytest.raises(ValueError, match=refused):
        tester.evaluate(embeddings, labels, pairs=[("photo", references)])


def test_test_normalises_once_as_evaluate_does():
    """A near tie (float64 cosine gap 5.7e-8, under float32's resolution at 1): normalising a second
    time moves the float32 cosines by an ulp and swaps the two neighbours. test() hands evaluate() the
    model's outputs unnormalised, so both score one normalisation of the same outputs."""
    queries = torch.tensor([[1.140625, -1.0, 1.0703125]])
    gallery = torch.tensor([[1.140625, -1.0, 1.0625], [1.140625, -1.0, 1.078125]])
    query_labels, gallery_labels = torch.tensor([0]), torch.tensor([1, 0])
    datasets = {"photo": torch.utils.data.TensorDataset(queries, query_labels),
                "sketch": torch.utils.data.TensorDataset(gallery, gallery_labels)}
    tester = make_tester()
    pairs = [("photo", "sketch")]
    tested = scores_without_epoch(tester.test(datasets, 0, torch.nn.Identity(), pairs=pairs))
    labels = {"photo": query_labels, "sketch": gallery_labels}
    assert tested == tester.evaluate({"photo": queries, "sketch": gallery}, labels, pairs=pairs)
    twice = {name: torch.nn.functional.normalize(values, dim=1) for name, values in (("photo", queries),
                                                                                      ("sketch", gallery))}
    assert tester.evaluate(twice, labels, pairs=pairs) != tested  # what scoring normalised outputs gave


def test_a_pair_without_class_mates_is_left_out_of_the_mean_with_a_warning(caplog):
    tester = make_tester()
    embeddings = {name: torch.randn(size, 4, generator=torch.Generator().manual_seed(size))
                  for name, size in (("a", 3), ("b", 2), ("c", 4))}
    labels = {"a": torch.tensor([0, 0, 0]), "b": torch.tensor([1, 1]), "c": torch.tensor([0, 1, 0, 1])}
    pairs = [("a", "b"), ("a", "c"), ("c", "a")]
    with pytest.warns(UserWarning, match="no item of their class") as caught, caplog.at_level("WARNING"):
        results = tester.evaluate(embeddings, labels, pairs)
    # Named by pair (b has no class 0, a no class 1), at this line, once each.
    assert [str(warning.message) for warning in caught] == [
        "3 of 3 queries have no item of their class in the reference set (R = 0) of pair a->b",
        "2 of 4 queries have no item of their class in the reference set (R = 0) of pair c->a",
    ]
    assert {warning.filename for warning in caught} == {__file__}
    with warnings.catch_warnings():  # a user's filter on the words of the warning still silences it
        warnings.filterwarnings("error")
        warnings.filterwarnings("ignore", message=r"\d+ of \d+ queries have no item")  # checked first
        tester.evaluate(embeddings, labels, pairs)
    assert math.isnan(results["a->b"]["precision_at_1"])  # a's class 0 is absent from b
    for metric, value in results["mean"].items():
        assert value == pytest.approx((results["a->c"][metric] + results["c->a"][metric]) / 2, rel=1e-12), metric
    assert "leaves out ['a->b']" in caplog.text
    with pytest.warns(UserWarning):
        only_undefined = tester.evaluate(embeddings, labels, [("a", "b")])
    assert all(math.isnan(value) for value in only_undefined["mean"].values())


def test_summary_table_before_any_results_says_so():
    with pytest.raises(ValueError, match="no results yet"):
        make_tester().summary_table()
