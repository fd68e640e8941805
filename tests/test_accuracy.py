"""PrecisionAtKCalculator against a plain NumPy ranking and against PML's AccuracyCalculator."""
import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_protoot import accuracy
from pml_protoot.accuracy import PrecisionAtKCalculator, _Candidates

R_METRICS = ("r_precision", "mean_average_precision_at_r", "mean_average_precision", "mean_reciprocal_rank")


def tied_embeddings(num, seed, dtype):
    """Rows with exactly four ones in 16 dims: after L2 normalisation every entry is 0 or 0.5,
    so all inner products are exact multiples of 0.25 in any dtype and ties are frequent."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((num, 16))
    for row in rows:
        row[rng.choice(16, size=4, replace=False)] = 1.0
    return torch.tensor(rows, dtype=dtype)


def imbalanced_labels(num, seed, num_classes=5):
    rng = np.random.default_rng(seed)
    weights = np.arange(1, num_classes + 1, dtype=float) ** 2
    return torch.tensor(rng.choice(num_classes, size=num, p=weights / weights.sum()))


def reference_ranking(query, reference, exclude_self):
    """Naive ranking: sort by (-cosine similarity, gallery index) with NumPy lexsort, in float64."""
    q = query.double().numpy()
    g = reference.double().numpy()
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    rankings = []
    for i, row in enumerate(q):
        order = [j for j in np.lexsort((np.arange(len(g)), -(g @ row))) if not (exclude_self and j == i)]
        rankings.append(order)
    return rankings


def reference_metrics(query, query_labels, reference, reference_labels, k_values, exclude_self=False):
    """ProtoOT's micro P@k and PML's R-based metrics, one query at a time."""
    ql, rl = query_labels.numpy(), reference_labels.numpy()
    hits = {k: 0 for k in k_values}
    denominators = {k: 0 for k in k_values}
    per_query = {name: [] for name in ("precision_at_1",) + R_METRICS}
    for i, order in enumerate(reference_ranking(query, reference, exclude_self)):
        relevant = rl[order] == ql[i]
        R = int(relevant.sum())
        if R == 0:
            continue
        for k in k_values:
            hits[k] += int(relevant[: min(k, R)].sum())
            denominators[k] += min(k, R)
        precisions = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
        per_query["precision_at_1"].append(float(relevant[0]))
        per_query["r_precision"].append(relevant[:R].sum() / R)
        per_query["mean_average_precision_at_r"].append((precisions[:R] * relevant[:R]).sum() / R)
        per_query["mean_average_precision"].append((precisions * relevant).sum() / R)
        per_query["mean_reciprocal_rank"].append(1.0 / (np.argmax(relevant) + 1))
    expected = {f"precision_at_{k}": hits[k] / denominators[k] for k in k_values}
    expected.update({name: float(np.mean(values)) for name, values in per_query.items()})
    return expected


def calculator(k_values, device, **kwargs):
    return PrecisionAtKCalculator(k_values=k_values, exclude=("NMI", "AMI"), device=device, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_matches_naive_ranking_with_ties_and_imbalance(dtype, device):
    query, reference = tied_embeddings(60, 0, dtype), tied_embeddings(90, 1, dtype)
    query_labels, reference_labels = imbalanced_labels(60, 2), imbalanced_labels(90, 3)
    # k below R, around R, above every R and above the gallery size (90).
    k_values = (1, 3, 10, 40, 200)
    # chunk_bytes small enough that the queries are split into several chunks.
    got = calculator(k_values, device, chunk_bytes=16 * 90 * 7).get_accuracy(
        query, query_labels, reference, reference_labels
    )
    expected = reference_metrics(query, query_labels, reference, reference_labels, k_values)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-12), name


def test_ref_includes_query_leaves_each_query_out(device):
    embeddings, labels = tied_embeddings(70, 4, torch.float32), imbalanced_labels(70, 5)
    k_values = (1, 5, 30)
    got = calculator(k_values, device).get_accuracy(embeddings, labels)
    expected = reference_metrics(embeddings, labels, embeddings, labels, k_values, exclude_self=True)
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-12), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_candidates_rank_like_a_full_stable_sort(dtype, device):
    # Six distinct values: ties everywhere, also between relevant and irrelevant items, which
    # the float32 fast path must hand to the ranking by gallery index.
    generator = torch.Generator().manual_seed(18)
    similarities = (torch.randint(0, 6, (40, 300), generator=generator) / 8).to(device=device, dtype=dtype)
    ids = torch.randperm(300, generator=generator)  # gallery index of each column
    block = slice(100, 160)  # the relevant columns
    threshold = 2 / 8
    candidates = _Candidates(ids.to(device), 40)
    thresholds = torch.full((40,), threshold, dtype=dtype, device=device)
    candidates.add(similarities[:, block].contiguous(), thresholds, block.start, relevant=True)
    for start, stop in ((0, 64), (64, 100), (160, 300)):
        candidates.add(similarities[:, start:stop].contiguous(), thresholds, start)
    got = candidates.ranked_relevance().cpu()
    for row, ranked in zip(similarities.cpu().tolist(), got):
        # Full stable sort by (similarity descending, gallery index ascending), then the cut.
        order = sorted(range(300), key=lambda column: (-row[column], int(ids[column])))
        expected = [block.start <= column < block.stop for column in order if row[column] >= threshold]
        assert ranked[: len(expected)].tolist() == expected
        assert not ranked[len(expected) :].any()
    assert candidates.counts.tolist() == [sum(value >= threshold for value in row) for row in similarities.cpu().tolist()]


@pytest.mark.filterwarnings("ignore:.*R = 0")
@pytest.mark.parametrize("include", [(), ("precision_at_3", "r_precision", "mean_average_precision_at_r")])
def test_small_tiles_and_thresholds_set_too_high(include, device, monkeypatch):
    query, reference = tied_embeddings(50, 19, torch.float32), tied_embeddings(80, 20, torch.float32)
    query_labels, reference_labels = imbalanced_labels(50, 21), imbalanced_labels(80, 22)
    calc = calculator((1, 3, 10), device, include=include, chunk_bytes=16 * 80 * 9)
    expected = reference_metrics(query, query_labels, reference, reference_labels, (1, 3, 10))
    # Tiles of 5 columns for chunks of 9 queries (on CPU).
    monkeypatch.setattr(accuracy, "_CACHE_TILE_BYTES", 4 * 9 * 5)
    tiled = calc.get_accuracy(query, query_labels, reference, reference_labels)
    # A threshold no similarity reaches: every query is ranked again over the whole gallery.
    monkeypatch.setattr(accuracy, "_estimated_thresholds", lambda q, g, depth: torch.full((len(q),), 2.0, device=q.device))
    rescued = calc.get_accuracy(query, query_labels, reference, reference_labels)
    for got in (tiled, rescued):
        assert got.keys() == (set(include) or expected.keys())
        for name in got:
            assert got[name] == pytest.approx(expected[name], rel=1e-12), name


def test_queries_without_relevant_items_are_excluded_with_warning(device):
    query, reference = tied_embeddings(30, 6, torch.float32), tied_embeddings(50, 7, torch.float32)
    query_labels = imbalanced_labels(30, 8, num_classes=4)
    query_labels[:4] = 9  # class 9 is absent from the gallery
    reference_labels = imbalanced_labels(50, 9, num_classes=4)
    with pytest.warns(UserWarning, match="4 of 30 queries"):
        got = calculator((1, 5), device).get_accuracy(query, query_labels, reference, reference_labels)
    expected = reference_metrics(query, query_labels, reference, reference_labels, (1, 5))
    assert got == pytest.approx(expected, rel=1e-12)


def test_all_queries_without_relevant_items_give_nan(device):
    with pytest.warns(UserWarning, match="3 of 3"):
        got = calculator((1,), device, include=("precision_at_1",)).get_accuracy(
            torch.randn(3, 4), torch.tensor([5, 5, 5]), torch.randn(4, 4), torch.tensor([0, 1, 1, 0])
        )
    assert np.isnan(got["precision_at_1"])


@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_agrees_with_pml_where_definitions_agree(ref_includes_query, device):
    # Continuous data: no ties, so PML's faiss L2 ranking equals the cosine ranking.
    generator = torch.Generator().manual_seed(10)
    query = torch.nn.functional.normalize(torch.randn(80, 8, generator=generator), dim=1)
    reference = torch.nn.functional.normalize(torch.randn(120, 8, generator=generator), dim=1)
    query_labels = imbalanced_labels(80, 11)
    reference_labels = imbalanced_labels(120, 12)
    if ref_includes_query:
        reference = torch.cat([query, reference])
        reference_labels = torch.cat([query_labels, reference_labels])
    # PML with k=None ranks the whole gallery, so its R-based metrics are uncapped too.
    pml = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision", "r_precision", "mean_average_precision_at_r"),
        device=torch.device("cpu"),
    ).get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query)
    ours = calculator((1,), device).get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query)
    for name, value in pml.items():
        assert ours[name] == pytest.approx(value, rel=1e-5), name


def test_pml_k_caps_r_metrics_but_ours_do_not(device):
    generator = torch.Generator().manual_seed(13)
    embeddings = torch.randn(200, 8, generator=generator)
    labels = torch.arange(200) % 2  # R = 99 for every query
    capped = AccuracyCalculator(include=("r_precision",), k=10, device=torch.device("cpu")).get_accuracy(
        torch.nn.functional.normalize(embeddings, dim=1), labels
    )
    ours = calculator((1,), device, include=("r_precision",)).get_accuracy(embeddings, labels)
    expected = reference_metrics(embeddings, labels, embeddings, labels, (1,), exclude_self=True)
    assert ours["r_precision"] == pytest.approx(expected["r_precision"], rel=1e-12)
    assert capped["r_precision"] != pytest.approx(expected["r_precision"], rel=1e-3)


def test_avg_of_avgs_and_per_class(device):
    query, reference = tied_embeddings(40, 14, torch.float32), tied_embeddings(60, 15, torch.float32)
    query_labels, reference_labels = imbalanced_labels(40, 16, 3), imbalanced_labels(60, 17, 3)
    per_class = calculator((5,), device, return_per_class=True, include=("precision_at_5", "r_precision")).get_accuracy(
        query, query_labels, reference, reference_labels
    )
    for position, label in enumerate(torch.unique(query_labels)):
        mask = query_labels == label
        expected = reference_metrics(query[mask], query_labels[mask], reference, reference_labels, (5,))
        assert per_class["precision_at_5"][position] == pytest.approx(expected["precision_at_5"], rel=1e-12)
        assert per_class["r_precision"][position] == pytest.approx(expected["r_precision"], rel=1e-12)
    averaged = calculator((5,), device, avg_of_avgs=True, include=("precision_at_5",)).get_accuracy(
        query, query_labels, reference, reference_labels
    )
    assert averaged["precision_at_5"] == pytest.approx(np.mean(per_class["precision_at_5"]), rel=1e-12)


def test_metric_names_follow_k_values():
    calc = PrecisionAtKCalculator(k_values=(15, 1, 5, 5), exclude=("NMI", "AMI"), device=torch.device("cpu"))
    assert calc.k_values == (1, 5, 15)
    assert {"precision_at_1", "precision_at_5", "precision_at_15", "r_precision"} <= set(calc.get_curr_metrics())


@pytest.mark.parametrize("k_values", [(0,), (5, -1), (), (1.5,)])
def test_bad_k_values(k_values):
    with pytest.raises(ValueError, match="k_values"):
        PrecisionAtKCalculator(k_values=k_values)


def test_bad_inputs():
    calc = PrecisionAtKCalculator(k_values=(1,), include=("precision_at_1",), device=torch.device("cpu"))
    x, labels = torch.randn(5, 3), torch.arange(5)
    with pytest.raises(ValueError, match="query_labels must have one label per query embedding"):
        calc.get_accuracy(x, labels[:4], x, labels)
    with pytest.raises(ValueError, match="reference_labels must be 1-D"):
        calc.get_accuracy(x, labels, x, labels[:, None])
    with pytest.raises(TypeError, match="query_labels must hold integers"):
        calc.get_accuracy(x, labels.float(), x, labels)
    with pytest.raises(ValueError, match="same embedding size"):
        calc.get_accuracy(x, labels, torch.randn(5, 4), labels)
    with pytest.raises(ValueError, match="query must hold at least one"):
        calc.get_accuracy(x[:0], labels[:0], x, labels)
    with pytest.raises(ValueError, match="ref_includes_query"):
        calc.get_accuracy(x, labels, torch.randn(5, 3), labels, ref_includes_query=True)
    with pytest.raises(ValueError, match="finite"):
        calc.get_accuracy(torch.full((5, 3), float("nan")), labels, x, labels)
