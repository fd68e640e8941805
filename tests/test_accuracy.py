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
        # Row by row, the same summation for every gallery row: identical rows score identically.
        similarities = (g * row).sum(axis=1)
        order = [j for j in np.lexsort((np.arange(len(g)), -similarities)) if not (exclude_self and j == i)]
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


def test_a_callers_autocast_does_not_lower_the_ranking_precision(device):
    """Inference is often wrapped in autocast; the ranking and the clustering still run in float32
    (bfloat16 products failed in the numpy step on a CPU, and would have ranked coarsely on a GPU)."""
    query, reference = tied_embeddings(60, 0, torch.float32), tied_embeddings(90, 1, torch.float32)
    query_labels, reference_labels = imbalanced_labels(60, 2), imbalanced_labels(90, 3)
    calc = PrecisionAtKCalculator(k_values=(1, 3, 10), device=device)
    outside = calc.get_accuracy(query, query_labels, reference, reference_labels)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        inside = calc.get_accuracy(query, query_labels, reference, reference_labels)
    assert inside == outside
    expected = reference_metrics(query, query_labels, reference, reference_labels, (1, 3, 10))
    for name in expected:
        assert inside[name] == pytest.approx(expected[name], rel=1e-12), name


def duplicated_rows(num, distinct, seed, dtype):
    """``num`` rows drawn from ``distinct`` random unit vectors: exact duplicates, whose float
    products ``torch.mm`` may round differently from column to column."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.nn.functional.normalize(torch.randn(distinct, 24, generator=generator, dtype=torch.float64), dim=1)
    return pool[torch.randint(0, distinct, (num,), generator=generator)].to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prefilter", [None, "bf16"])
@pytest.mark.parametrize("gallery_size, distinct", [(20, 1), (50, 1), (50, 6), (500, 1), (500, 40)])
def test_duplicate_gallery_rows_tie_and_rank_by_index(gallery_size, distinct, prefilter, dtype, device):
    """A collapsed model (every embedding the same) or duplicated images: identical rows are
    exact ties, ranked by gallery index, however the products round (PML's ranking is the same)."""
    if prefilter == "bf16" and device.type != "cpu":
        pytest.skip("bfloat16 screening runs on CPU only")
    query, reference = duplicated_rows(40, distinct, 40, dtype), duplicated_rows(gallery_size, distinct, 41, dtype)
    query_labels, reference_labels = torch.arange(40) % 4, torch.arange(gallery_size) % 5
    k_values = (1, 5, 15)
    calc = calculator(k_values, device, prefilter=prefilter)
    got = calc.get_accuracy(query, query_labels, reference, reference_labels)
    expected = reference_metrics(query, query_labels, reference, reference_labels, k_values)
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-12), name
    if distinct == 1:  # every item ties: the ranking is the gallery order, class 0 first
        assert got["precision_at_1"] == pytest.approx(0.25)


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("include", [(), ("precision_at_3", "r_precision", "mean_average_precision_at_r")])
def test_small_tiles_and_thresholds_set_too_high(include, dtype, device, monkeypatch):
    query, reference = tied_embeddings(50, 19, dtype), tied_embeddings(80, 20, dtype)
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
    with pytest.warns(UserWarning, match="4 of 30 queries") as caught:
        got = calculator((1, 5), device).get_accuracy(query, query_labels, reference, reference_labels)
    assert caught[0].filename == __file__  # the caller's line
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


def float64_only_near_tie(query_dtype, reference_dtype):
    """One query and two gallery rows whose cosines differ by about 2e-12: in float64 the
    second row, of the query's class (7), ranks first; rounded to float32 both similarities are
    1.0, a tie that the first row, of class 8, wins on gallery index. The float64 side holds the
    fine offset 1e-6, the other side 2^-20, exact in float16 and float32."""
    fine, coarse = 1e-6, 2.0**-20
    query_offset, reference_offset = (fine, coarse) if query_dtype == torch.float64 else (coarse, fine)
    query = torch.tensor([[1.0, query_offset]], dtype=torch.float64)
    reference = torch.tensor([[1.0, -reference_offset], [1.0, reference_offset]], dtype=torch.float64)
    return query, torch.tensor([7]), reference, torch.tensor([8, 7])


@pytest.mark.parametrize(
    "query_dtype, reference_dtype",
    [(torch.float64, torch.float32), (torch.float32, torch.float64), (torch.float16, torch.float64)],
)
def test_mixed_float_dtypes_score_in_the_promoted_dtype(query_dtype, reference_dtype, device):
    near_query, near_query_labels, near_reference, near_reference_labels = float64_only_near_tie(
        query_dtype, reference_dtype
    )
    # block_diag: the near-tie rows get dimensions of their own (similarity 0 to the tied rows).
    query = torch.block_diag(tied_embeddings(60, 41, torch.float64), near_query).to(query_dtype)
    reference = torch.block_diag(tied_embeddings(90, 42, torch.float64), near_reference).to(reference_dtype)
    query_labels = torch.cat([imbalanced_labels(60, 44), near_query_labels])
    reference_labels = torch.cat([imbalanced_labels(90, 45), near_reference_labels])
    k_values = (1, 3, 10)
    calc = calculator(k_values, device)
    got = calc.get_accuracy(query, query_labels, reference, reference_labels)
    promoted = torch.promote_types(query_dtype, reference_dtype)
    assert got == calc.get_accuracy(query.to(promoted), query_labels, reference.to(promoted), reference_labels)
    expected = reference_metrics(query, query_labels, reference, reference_labels, k_values)
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-12), name
    # The data tell the dtypes apart: scored in float32, the near-tie query (1 of 61, every one
    # with R > 0) misses its neighbour.
    in_float32 = calc.get_accuracy(query.float(), query_labels, reference.float(), reference_labels)
    assert in_float32["precision_at_1"] == pytest.approx(expected["precision_at_1"] - 1 / 61, rel=1e-12)


def test_embeddings_that_require_grad_are_scored_detached(device):
    query = tied_embeddings(40, 49, torch.float32).requires_grad_()  # a leaf, as a parameter
    scale = torch.ones(16, requires_grad=True)
    reference = tied_embeddings(70, 50, torch.float32) * scale  # a model's output, not a leaf
    query_labels, reference_labels = imbalanced_labels(40, 45), imbalanced_labels(70, 46)
    k_values = (1, 5, 30)
    calc = calculator(k_values, device)
    got = calc.get_accuracy(query, query_labels, reference, reference_labels)
    expected = reference_metrics(query.detach(), query_labels, reference.detach(), reference_labels, k_values)
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-12), name
    got_self = calc.get_accuracy(query, query_labels)  # the query set as its own gallery
    expected_self = reference_metrics(
        query.detach(), query_labels, query.detach(), query_labels, k_values, exclude_self=True
    )
    for name in expected_self:
        assert got_self[name] == pytest.approx(expected_self[name], rel=1e-12), name


def test_metric_names_follow_k_values():
    calc = PrecisionAtKCalculator(k_values=(15, 1, 5, 5), exclude=("NMI", "AMI"), device=torch.device("cpu"))
    assert calc.k_values == (1, 5, 15)
    assert {"precision_at_1", "precision_at_5", "precision_at_15", "r_precision"} <= set(calc.get_curr_metrics())


@pytest.mark.parametrize("k_values, error", [((0,), ValueError), ((5, -1), ValueError), ((), ValueError),
                                             ((1.5,), TypeError)])
def test_bad_k_values(k_values, error):
    with pytest.raises(error, match="k_values"):
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


# ------------------------------------------------------------------ bfloat16 screening
def plain_bf16_error_bound(q, g):
    """The screening bound written out for one query row and gallery rows, in float64:
    |q̃-q| max|g̃| + |q| max|g̃-g| + gamma_D (|q̃| max|g̃| + |q| max|g|) + D 2^-125."""
    qd, gd = q.double(), g.double()
    qr, gr = q.bfloat16().double(), g.bfloat16().double()
    dim = q.shape[-1]
    gamma = dim * 2.0**-24 / (1 - dim * 2.0**-24)

    def gmax(rows):
        return float(max(np.linalg.norm(row) for row in rows.numpy()))

    return [
        float(np.linalg.norm((a - b).numpy())) * gmax(gr)
        + float(np.linalg.norm(b.numpy())) * gmax(gr - gd)
        + gamma * (float(np.linalg.norm(a.numpy())) * gmax(gr) + float(np.linalg.norm(b.numpy())) * gmax(gd))
        + dim * 2.0**-125
        for a, b in zip(qr, qd)
    ]


def adversarial_bf16_rows(num, dim, seed):
    """Rows of one mantissa just above a bfloat16 rounding midpoint, times powers of two: each
    entry rounds up by almost 2^-8 relative, so a row's rounding error is parallel to the row
    and the errors of a row's product with itself add up to nearly the bound. Every row has the
    same exponents (permuted), hence the same norm."""
    rng = np.random.default_rng(seed)
    mantissa = 1 + (rng.integers(0, 127) + 0.5 + 2.0**-10) / 128
    exponents = rng.integers(-6, -2, size=dim)
    rows = [mantissa * 2.0 ** rng.permutation(exponents) for _ in range(num)]
    return torch.tensor(np.array(rows), dtype=torch.float32)


@pytest.mark.parametrize("rows", ["adversarial", "random", "mixed_signs"])
def test_bf16_error_bound_holds_and_is_nearly_reached(rows):
    dim = 128
    if rows == "adversarial":
        q = adversarial_bf16_rows(8, dim, 30)
        g = torch.cat([adversarial_bf16_rows(300, dim, 30)[8:], q])  # the queries' own rows too
    else:
        generator = torch.Generator().manual_seed(32)
        q, g = torch.randn(8, dim, generator=generator), torch.randn(300, dim, generator=generator)
        if rows == "random":
            q, g = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    bound = accuracy._bf16_product_error(q, accuracy._bf16_rounding_norms(g))
    assert bound.tolist() == pytest.approx(plain_bf16_error_bound(q, g), rel=1e-6)
    exact = (q @ g.T).double()  # the float32 similarities the ranking uses
    # p before its output rounding: float32 accumulation of the exact bf16 x bf16 terms.
    p = (q.bfloat16().float() @ g.bfloat16().float().T).double()
    worst = ((p - exact).abs().amax(1) / bound).max().item()
    assert worst <= 1.0
    if rows == "adversarial":
        assert worst > 0.99  # all errors aligned: the bound is tight, not a loose cap
    # What torch's bfloat16 product returns (rounded output) never falls below the floor.
    screened = (q.bfloat16() @ g.bfloat16().T).float()
    floors = torch.stack([accuracy._bf16_screen_floor(exact[:, j].float(), bound) for j in range(len(g))], 1)
    assert bool((screened >= floors).all())


def test_bf16_screen_floor_is_the_largest_bfloat16_below():
    thresholds = torch.tensor([0.3, -0.2, 0.0, 1.0, 0.123456])
    error = torch.tensor([0.004, 0.004, 0.0, 1e-3, 2.0**-30], dtype=torch.float64)
    floors = accuracy._bf16_screen_floor(thresholds, error)
    for floor, t, e in zip(floors.tolist(), thresholds.double().tolist(), error.tolist()):
        # Brute force over every finite bfloat16 value.
        every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).double()
        below = every[torch.isfinite(every) & (every <= t - e)]
        assert floor == below.max().item()


# 16 odd integers of 9-10 significant bits whose squares sum to 4^11: v = N / 2048 is a unit
# vector in float32 exactly, none of its entries is a bfloat16 value, and every inner product
# of two signed permutations of v is a multiple of 2^-22 that float32 computes exactly.
UNIT_NUMERATORS = np.array([691, 581, 517, 395, 415, 279, 297, 267, 347, 671, 587, 721, 257, 257, 505, 851])


def near_tie_data(seed, dtype):
    """Signed permutations of v: exact float32 similarities, spaced far below the bfloat16
    screening error (so the screen cannot separate them), many exactly tied, plus duplicated
    rows of the other class (ties between relevant and irrelevant items)."""
    assert (UNIT_NUMERATORS**2).sum() == 4**11
    rng = np.random.default_rng(seed)

    def rows(num):
        signs = rng.choice([-1.0, 1.0], size=(num, 16))
        return np.array([UNIT_NUMERATORS[rng.permutation(16)] for _ in range(num)]) * signs / 2048

    gallery = rows(1500)
    labels = (rng.random(1500) < 0.7).astype(np.int64)  # class 0: R about 450 of 1600
    duplicates = rng.choice(1500, size=100, replace=False)
    gallery = np.concatenate([gallery, gallery[duplicates]])
    labels = np.concatenate([labels, 1 - labels[duplicates]])
    order = rng.permutation(len(gallery))
    return (
        torch.tensor(rows(30), dtype=dtype),
        torch.tensor(rng.integers(0, 2, size=30)),
        torch.tensor(gallery[order], dtype=dtype),
        torch.tensor(labels[order]),
    )


SCREENED_METRICS = (
    "precision_at_1", "precision_at_5", "precision_at_300", "r_precision", "mean_average_precision_at_r"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prefilter", [None, "bf16"])
@pytest.mark.parametrize("include", [SCREENED_METRICS, ("mean_reciprocal_rank", "precision_at_5")])
def test_screened_and_exact_rankings_match_naive_ranking_at_near_ties(prefilter, include, dtype, device, monkeypatch):
    if prefilter == "bf16" and device.type != "cpu":
        pytest.skip("bfloat16 screening runs on CPU only")
    query, query_labels, reference, reference_labels = near_tie_data(33, dtype)
    # Several tiles and rescoring groups per chunk.
    monkeypatch.setattr(accuracy, "_CACHE_TILE_BYTES", 4 * 24 * 128)
    monkeypatch.setattr(accuracy, "_RESCORE_ROWS", 5)
    screened_calls = []
    original = accuracy._QueryChunk.screened_candidates
    monkeypatch.setattr(
        accuracy._QueryChunk, "screened_candidates", lambda *args: screened_calls.append(1) or original(*args)
    )
    calc = calculator((1, 5, 300), device, include=include, prefilter=prefilter)
    got = calc.get_accuracy(query, query_labels, reference, reference_labels)
    expected = reference_metrics(query, query_labels, reference, reference_labels, (1, 5, 300))
    # One chunk per query class; float64 keeps the exact path.
    assert len(screened_calls) == 2 * (prefilter == "bf16" and dtype == torch.float32)
    assert got.keys() == set(include)
    for name in include:
        assert got[name] == pytest.approx(expected[name], rel=1e-12), name


@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_screened_path_matches_naive_ranking_with_ties_and_imbalance(ref_includes_query):
    query, reference = tied_embeddings(60, 34, torch.float32), tied_embeddings(200, 35, torch.float32)
    query_labels, reference_labels = imbalanced_labels(60, 36), imbalanced_labels(200, 37)
    if ref_includes_query:
        reference, reference_labels = torch.cat([query, reference]), torch.cat([query_labels, reference_labels])
    k_values = (1, 3, 10, 40)
    include = ("precision_at_1", "precision_at_3", "precision_at_40", "r_precision", "mean_average_precision_at_r")
    calc = calculator(k_values, torch.device("cpu"), include=include, prefilter="bf16")
    got = calc.get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query)
    expected = reference_metrics(
        query, query_labels, reference, reference_labels, k_values, exclude_self=ref_includes_query
    )
    for name in got:
        assert got[name] == pytest.approx(expected[name], rel=1e-12), name


@pytest.mark.parametrize("include", [SCREENED_METRICS, SCREENED_METRICS + ("mean_reciprocal_rank",)])
def test_screen_of_a_gallery_of_the_queries_class_alone_ranks_it_all(include):
    query, reference = tied_embeddings(6, 40, torch.float32), tied_embeddings(50, 41, torch.float32)
    labels, reference_labels = torch.zeros(6, dtype=torch.long), torch.zeros(50, dtype=torch.long)
    calc = calculator((1, 5, 300), torch.device("cpu"), include=include, prefilter="bf16")
    got = calc.get_accuracy(query, labels, reference, reference_labels, False)
    assert all(value == 1.0 for value in got.values()), got


def test_calculator_pickles_and_deep_copies_with_its_own_settings():
    import copy
    import pickle

    query, reference = tied_embeddings(40, 42, torch.float32), tied_embeddings(90, 43, torch.float32)
    query_labels, reference_labels = imbalanced_labels(40, 44), imbalanced_labels(90, 45)
    calc = calculator((1, 5), torch.device("cpu"))
    expected = calc.get_accuracy(query, query_labels, reference, reference_labels, False)
    assert pickle.loads(pickle.dumps(calc)).get_accuracy(query, query_labels, reference, reference_labels, False) == expected
    per_class_mean = copy.deepcopy(calc)
    per_class_mean.avg_of_avgs = True
    averaged = per_class_mean.get_accuracy(query, query_labels, reference, reference_labels, False)
    assert averaged["precision_at_5"] != expected["precision_at_5"]
    assert calc.get_accuracy(query, query_labels, reference, reference_labels, False) == expected


def test_screened_rows_short_of_depth_are_ranked_again(monkeypatch):
    # A raised threshold that nothing reaches: every row falls short and is ranked in full.
    query, query_labels, reference, reference_labels = near_tie_data(38, torch.float32)
    monkeypatch.setattr(accuracy, "_likely_reach", lambda kth, error: torch.full_like(kth, 2.0))
    calc = calculator((1, 5, 300), torch.device("cpu"), include=SCREENED_METRICS, prefilter="bf16")
    got = calc.get_accuracy(query, query_labels, reference, reference_labels)
    expected = reference_metrics(query, query_labels, reference, reference_labels, (1, 5, 300))
    for name in SCREENED_METRICS:
        assert got[name] == pytest.approx(expected[name], rel=1e-12), name


@pytest.mark.parametrize(
    "prefilter, native, dtype, include, gallery_size, screened",
    [
        ("auto", True, torch.float32, SCREENED_METRICS, 2**14, True),
        ("auto", False, torch.float32, SCREENED_METRICS, 2**14, False),  # no native bfloat16
        ("auto", True, torch.float32, SCREENED_METRICS, 2**14 - 1, False),  # small gallery
        ("auto", True, torch.float32, ("mean_average_precision",), 2**14, False),  # every item kept
        ("auto", True, torch.float64, SCREENED_METRICS, 2**14, False),
        ("bf16", False, torch.float32, SCREENED_METRICS, 100, True),
        ("bf16", True, torch.float64, SCREENED_METRICS, 100, False),
        (None, True, torch.float32, SCREENED_METRICS, 2**14, False),
    ],
)
def test_which_rankings_are_screened(prefilter, native, dtype, include, gallery_size, screened, monkeypatch):
    monkeypatch.setattr(accuracy, "_native_bf16_matmul", lambda: native)
    calls = []

    def stop(screened_path):
        def record(*args):
            calls.append(int(screened_path))
            raise ZeroDivisionError  # stop at the first chunk: which path did it take?

        return record

    monkeypatch.setattr(accuracy._QueryChunk, "screened_candidates", stop(True))
    monkeypatch.setattr(accuracy._QueryChunk, "candidates", stop(False))
    generator = torch.Generator().manual_seed(39)
    reference = torch.randn(gallery_size, 4, generator=generator, dtype=dtype)
    calc = calculator((1, 5, 300), torch.device("cpu"), include=include, prefilter=prefilter)
    with pytest.raises(ZeroDivisionError):
        calc.get_accuracy(reference[:3], torch.zeros(3, dtype=torch.long), reference, torch.arange(gallery_size) % 40)
    assert calls == [int(screened)]


def test_bad_prefilter():
    with pytest.raises(ValueError, match="prefilter must be one of"):
        PrecisionAtKCalculator(prefilter="fp16")
    with pytest.raises(ValueError, match="prefilter='bf16' runs on CPU only"):
        PrecisionAtKCalculator(prefilter="bf16", device=torch.device("cuda"))


@pytest.mark.parametrize("rank", [1, 60, 450])
def test_screen_keeps_every_item_at_or_above_the_threshold(rank):
    # Thresholds exactly at a row's rank-th similarity (the tightest that keeps rank items):
    # a screen that loses any item at the threshold shows in the counts and the ranking.
    query, query_labels, reference, reference_labels = near_tie_data(40, torch.float32)
    gallery = accuracy._ClassSortedGallery(reference, reference_labels, torch.device("cpu"))
    rows = torch.nonzero(query_labels == 1).flatten()
    chunk = accuracy._QueryChunk(query[rows], gallery, gallery.block(1))
    exact = query[rows].double().numpy() @ reference.double().numpy().T  # exact: multiples of 2^-22
    thresholds = torch.tensor(-np.sort(-exact, axis=1)[:, rank - 1], dtype=torch.float32)
    candidates = chunk.screened_candidates(thresholds)
    got = candidates.ranked_relevance()
    for row, similarities in enumerate(exact):
        order = np.lexsort((np.arange(len(similarities)), -similarities))
        expected = [reference_labels[j] == 1 for j in order if similarities[j] >= thresholds[row]]
        assert candidates.counts[row] == len(expected)
        assert got[row, : len(expected)].tolist() == expected


def test_a_subclass_metric_reading_pml_knn_labels_is_refused_by_name():
    class WithKnnMetric(PrecisionAtKCalculator):
        def calculate_precision_at_2(self, knn_labels, query_labels, **kwargs):
            return float((knn_labels[:, :2] == query_labels[:, None]).float().mean())

        def requires_knn(self):
            return super().requires_knn() + ["precision_at_2"]

    calc = WithKnnMetric(include=("precision_at_1", "precision_at_2"), device=torch.device("cpu"))
    embeddings, labels = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(NotImplementedError, match=r"metrics \['precision_at_2'\] read PML's knn_labels"):
        calc.get_accuracy(embeddings, labels, embeddings, labels, True)
    assert set(calc.get_accuracy(embeddings, labels, embeddings, labels, True, include=("precision_at_1",))) == {
        "precision_at_1"}


def test_a_subclass_metric_may_read_the_calculators_own_ranking_statistics():
    class WithReciprocalRankCopy(PrecisionAtKCalculator):
        def calculate_reciprocal_rank_copy(self, reciprocal_rank=None, valid_query_labels=None, **kwargs):
            return float(reciprocal_rank.double().mean())

        def requires_knn(self):
            return super().requires_knn() + ["reciprocal_rank_copy"]

    calc = WithReciprocalRankCopy(include=("mean_reciprocal_rank", "reciprocal_rank_copy"), device=torch.device("cpu"))
    query, reference = tied_embeddings(20, 50, torch.float32), tied_embeddings(40, 51, torch.float32)
    query_labels, reference_labels = imbalanced_labels(20, 52), imbalanced_labels(40, 53)
    got = calc.get_accuracy(query, query_labels, reference, reference_labels, False)
    assert got["reciprocal_rank_copy"] == pytest.approx(got["mean_reciprocal_rank"])


def small_retrieval_set(seed=60):
    query, reference = tied_embeddings(20, seed, torch.float32), tied_embeddings(40, seed + 1, torch.float32)
    return query, imbalanced_labels(20, seed + 2, 3), reference, imbalanced_labels(40, seed + 3, 3)


@pytest.mark.parametrize("argument", ["include", "exclude"])
@pytest.mark.parametrize(
    "names, error, match",
    [
        (("precision_at_10",), ValueError, r"{} must name metrics among .* got unknown \['precision_at_10'\]"),
        ("precision_at_15", TypeError, "{} must be a tuple or list of metric names, got 'precision_at_15'"),
    ],
)
def test_per_call_include_and_exclude_are_refused_as_the_constructor_refuses_them(argument, names, error, match):
    # PML drops an unknown per-call name and reads a str as substrings: {} or a wrong dict, silently.
    calc = calculator((1, 5, 15), torch.device("cpu"))
    with pytest.raises(error, match=match.format(argument)):
        calc.get_accuracy(*small_retrieval_set(), False, **{argument: names})
    with pytest.raises(error, match=match.format(argument)):
        PrecisionAtKCalculator(k_values=(1, 5, 15), device=torch.device("cpu"), **{argument: names})


def test_per_call_include_must_be_configured_and_exclude_may_name_any_metric():
    calc = calculator((1, 5, 15), torch.device("cpu"))  # NMI and AMI excluded
    data = small_retrieval_set()
    with pytest.raises(ValueError, match=r"include must name metrics among .* got unknown \['NMI'\]"):
        calc.get_accuracy(*data, False, include=("NMI",))
    got = calc.get_accuracy(*data, False, exclude=("NMI", "precision_at_15"))  # excluding NMI again is harmless
    assert set(got) == {"precision_at_1", "precision_at_5"} | set(R_METRICS)


def test_device_may_be_a_string_as_torch_accepts():
    calc = PrecisionAtKCalculator(k_values=(1, 5), include=("precision_at_5",), device="cpu", prefilter="bf16")
    assert calc.device == torch.device("cpu")
    data = small_retrieval_set()
    expected = calculator((1, 5), torch.device("cpu"), include=("precision_at_5",)).get_accuracy(*data, False)
    assert calc.get_accuracy(*data, False) == expected
    with pytest.raises(ValueError, match="device must name a device such as 'cpu' or 'cuda:0', got 'gpu'"):
        PrecisionAtKCalculator(device="gpu")
    with pytest.raises(TypeError, match="device must be a torch.device, a device string such as 'cpu' or None, got 1"):
        PrecisionAtKCalculator(device=1.5)


@pytest.mark.parametrize("flag", ["avg_of_avgs", "return_per_class"])  # progress: a bar or not, any truthy value
@pytest.mark.parametrize("value", ["False", 0, None])
def test_bool_flags_must_be_bools(flag, value):
    # bool("False") is True: avg_of_avgs="False" would silently average per class.
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got {value!r}"):
        PrecisionAtKCalculator(device=torch.device("cpu"), **{flag: value})


@pytest.mark.parametrize("value", ["no", 0, 1.0])
def test_ref_includes_query_must_be_a_bool(value):
    calc = calculator((1,), torch.device("cpu"), include=("precision_at_1",))
    query, query_labels, _, _ = small_retrieval_set()
    with pytest.raises(TypeError, match=f"ref_includes_query must be True or False, got {value!r}"):
        calc.get_accuracy(query, query_labels, query, query_labels, value)


@pytest.mark.parametrize("k", [1, 5])
def test_a_subclass_override_of_precision_at_k_is_called(k):
    class WithOwnPrecision(PrecisionAtKCalculator):
        pass

    # Defined on the subclass as a plain method, as a user would write it.
    setattr(WithOwnPrecision, f"calculate_precision_at_{k}", lambda self, query_labels, **kwargs: 123.0)
    calc = WithOwnPrecision(k_values=(1, 5), include=("precision_at_1", "precision_at_5"), device=torch.device("cpu"))
    got = calc.get_accuracy(*small_retrieval_set(), False)
    expected = calculator((1, 5), torch.device("cpu")).get_accuracy(*small_retrieval_set(), False)
    other = 6 - k  # the other k keeps this class's value
    assert got == {f"precision_at_{k}": 123.0, f"precision_at_{other}": expected[f"precision_at_{other}"]}


def test_custom_metrics_receive_pmls_label_comparison_fn():
    class WithLabelMatchRate(PrecisionAtKCalculator):
        def calculate_label_match_rate(self, query_labels, reference_labels, label_comparison_fn, **kwargs):
            return float(label_comparison_fn(query_labels[:, None], reference_labels[None, :]).double().mean())

    query, query_labels, reference, reference_labels = small_retrieval_set()
    calc = WithLabelMatchRate(include=("label_match_rate", "precision_at_1"), device=torch.device("cpu"))
    got = calc.get_accuracy(query, query_labels, reference, reference_labels, False)
    expected = (query_labels[:, None] == reference_labels[None, :]).double().mean().item()
    assert got["label_match_rate"] == pytest.approx(expected, rel=1e-12)


def test_precision_at_1_equals_pmls_on_normalised_embeddings_only():
    # Two gallery rows: one near the query's direction but short (class 0), one off its
    # direction but close to it in L2 (class 1). Cosine ranks the first first; PML's L2 the second.
    query, query_labels = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    reference, reference_labels = torch.tensor([[0.1, 0.01], [0.9, 0.5]]), torch.tensor([0, 1])
    pml = AccuracyCalculator(include=("precision_at_1",), device=torch.device("cpu"))
    ours = calculator((1,), torch.device("cpu"), include=("precision_at_1",))
    assert ours.get_accuracy(query, query_labels, reference, reference_labels, False)["precision_at_1"] == 1.0
    assert pml.get_accuracy(query, query_labels, reference, reference_labels, False)["precision_at_1"] == 0.0
    unit = torch.nn.functional.normalize(reference, dim=1)
    assert pml.get_accuracy(query, query_labels, unit, reference_labels, False)["precision_at_1"] == 1.0


def clustered(num, num_classes, seed):
    """``(num, 8)`` embeddings around one random centre per class and their labels (every class present)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % num_classes
    centres = 2 * torch.randn(num_classes, 8, generator=generator)
    return centres[labels] + torch.randn(num, 8, generator=generator), labels


# 12 and 60 points warn in faiss (< 39 per centroid), 2000 and 3000 are subsampled (> 256 per centroid).
@pytest.mark.parametrize("num, num_classes", [(12, 3), (60, 5), (150, 3), (2000, 4), (3000, 3)])
def test_nmi_and_ami_are_pmls_default_clustering_exactly(num, num_classes):
    """The default clustering is PML's faiss K-means with min_points_per_centroid=1, a parameter faiss reads
    only to print its warning: the same cluster of every point, so the same NMI and AMI."""
    embeddings, labels = clustered(num, num_classes, seed=num)
    pml = AccuracyCalculator(include=("NMI", "AMI"), device=torch.device("cpu"))
    ours = PrecisionAtKCalculator(include=("NMI", "AMI"), device=torch.device("cpu"))
    assert torch.equal(ours.get_cluster_labels(embeddings, labels), pml.get_cluster_labels(embeddings, labels))
    expected = pml.get_accuracy(embeddings, labels, embeddings, labels, False)
    assert ours.get_accuracy(embeddings, labels, embeddings, labels, False) == expected
    assert ours.kmeans_func.kwargs == {**pml.kmeans_func.kwargs, "min_points_per_centroid": 1}


def test_nmi_of_a_small_set_prints_nothing(capfd):
    """faiss's K-means printed "WARNING clustering 12 points to 3 centroids: please provide at least 117
    training points" from C++ (no logging or warnings filter silences it) on every small set."""
    embeddings, labels = clustered(12, 3, seed=0)
    capfd.readouterr()
    PrecisionAtKCalculator(device=torch.device("cpu")).get_accuracy(embeddings, labels, embeddings, labels, False)
    captured = capfd.readouterr()
    assert captured.out == captured.err == ""


def test_a_kmeans_func_of_ones_own_is_used_as_given():
    calls = []

    def kmeans_func(x, num_clusters):
        calls.append((tuple(x.shape), num_clusters))
        return torch.zeros(len(x), dtype=torch.long)

    embeddings, labels = clustered(12, 3, seed=1)
    calc = PrecisionAtKCalculator(include=("NMI",), kmeans_func=kmeans_func, device=torch.device("cpu"))
    assert calc.kmeans_func is kmeans_func
    assert calc.get_accuracy(embeddings, labels, embeddings, labels, False) == {"NMI": 0.0}
    assert calls == [((12, 8), 3)]
