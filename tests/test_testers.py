"""CrossDomainTester: pairs, one embedding pass per domain, PML hook compatibility, errors."""
import json
import re

import pytest
import torch
from pytorch_metric_learning.utils.logging_presets import HookContainer

from pml_protoot.accuracy import PrecisionAtKCalculator
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
    tester = make_tester(end_of_testing_hook=hooks.end_of_testing_hook, pair_separator=separator,
                         normalize_embeddings=False)
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
def test_embeddings_follow_dataset_order_and_progress_switch(device, capsys, progress):
    datasets = domain_datasets({"photo": 10, "sketch": 12})
    trunk = CountingTrunk(6, 4).to(device)
    tester = make_tester(progress=progress)
    embeddings, labels = tester._embed_domain(datasets["sketch"], trunk, torch.nn.Identity(), None)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(trunk(datasets["sketch"].tensors[0].to(device)), dim=1)
    torch.testing.assert_close(embeddings, expected)
    assert torch.equal(labels.cpu(), datasets["sketch"].tensors[1])
    assert ("embedding" in capsys.readouterr().err) == progress
