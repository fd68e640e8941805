"""Tests for ``pml_protoot.ot.sinkhorn`` against references written plainly here.

References:
- ``official_sinkhorn``: the ProtoOT/SwAV formula of PROTOOT.md, line by line
  (plain ``exp``, repeated division), valid where ``exp(scores / epsilon)`` is finite.
- ``log_domain_official_sinkhorn``: the same rounds in the log domain, for epsilons where
  the plain formula overflows; it is itself checked against the plain one.
- POT (``ot.sinkhorn``, ``ot.bregman.sinkhorn_log``) for the converged plan.
"""
import math

import ot as pot
import pytest
import torch
import torch.nn.functional as F

import pml_protoot.ot as ot_module
from pml_protoot.ot import sinkhorn, _trusted_sinkhorn

NUM_SAMPLES, NUM_PROTOTYPES, DIM = 40, 7, 16
LOW_PRECISION = (torch.float16, torch.bfloat16)


def official_sinkhorn(scores, beta, epsilon, iterations, normalize_scores=False):
    """PROTOOT.md: Q = exp(S/eps)^T, Q /= sum(Q); rows -> beta, columns -> 1/N; return N Q^T."""
    if normalize_scores:
        scores = F.normalize(scores, dim=1)
    Q = torch.exp(scores / epsilon).t()
    Q /= torch.sum(Q)
    K, N = Q.shape
    for _ in range(iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q *= beta.unsqueeze(1)
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= N
    return (Q * N).t()


def log_domain_official_sinkhorn(scores, beta, epsilon, iterations):
    """The official rounds on log Q (no overflow); same result where the plain one is finite."""
    log_q = scores / epsilon
    num_samples = scores.shape[0]
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) + beta.log()
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(num_samples)
    return torch.exp(log_q + math.log(num_samples))


def random_scores(seed, shape=(NUM_SAMPLES, NUM_PROTOTYPES), dtype=torch.float64, device="cpu"):
    """Cosine similarities of random unit embeddings to random unit prototypes, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    *batch, num_samples, num_prototypes = shape
    embeddings = F.normalize(torch.randn(*batch, num_samples, DIM, generator=generator, dtype=torch.float64), dim=-1)
    prototypes = F.normalize(torch.randn(*batch, num_prototypes, DIM, generator=generator, dtype=torch.float64), dim=-1)
    return (embeddings @ prototypes.transpose(-1, -2)).to(device=device, dtype=dtype)


def random_marginal(seed, num_prototypes=NUM_PROTOTYPES, batch=(), dtype=torch.float64, device="cpu"):
    generator = torch.Generator().manual_seed(seed + 1000)
    beta = torch.rand(*batch, num_prototypes, generator=generator, dtype=torch.float64) + 0.2
    return (beta / beta.sum(-1, keepdim=True)).to(device=device, dtype=dtype)


def column_error(plan, beta):
    """L-infinity distance of the column marginal of Q = P / N from beta."""
    return (plan.sum(-2) / plan.shape[-2] - beta).abs().max().item()


@pytest.fixture
def count_log_domain_calls(monkeypatch):
    """Count calls of the log-domain fallback, so tests can prove which path ran."""
    calls = []
    original = ot_module._log_domain_sinkhorn

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(ot_module, "_log_domain_sinkhorn", spy)
    return calls


@pytest.fixture
def kernel_runs(monkeypatch):
    """Record every scaling-vector run: ``(shift, answered)``, the kernel kind and whether it
    returned a plan (``False``: it under/overflowed and the call fell back)."""
    runs = []
    original = ot_module._scaled_sinkhorn

    def spy(*args, shift, **options):
        solved = original(*args, shift=shift, **options)
        runs.append((shift, solved is not None))
        return solved

    monkeypatch.setattr(ot_module, "_scaled_sinkhorn", spy)
    return runs


@pytest.fixture(params=["plain", "shifted"])
def kernel(request, monkeypatch, kernel_runs):
    """Run a test on each round-1 kernel: plain ``exp(S/eps)`` (checked to have answered every
    call), or shifted by the column max (the plain kernel switched off)."""
    if request.param == "shifted":
        monkeypatch.setattr(ot_module, "_PLAIN_KERNEL_MAX_LOGIT", {torch.float32: -1.0, torch.float64: -1.0})
    yield request.param
    expected_run = (False, True) if request.param == "plain" else (True, True)
    assert kernel_runs and set(kernel_runs) == {expected_run}


@pytest.mark.parametrize("iterations", range(1, 11))
@pytest.mark.parametrize("normalize_scores", [False, True])
def test_equals_official_formula_in_float64(iterations, normalize_scores, kernel, device):
    scores = random_scores(iterations, device=device)
    if normalize_scores:
        scores = 3 * scores  # unnormalised rows, so the normalisation changes the result
    beta = random_marginal(iterations, device=device)
    expected = official_sinkhorn(scores, beta, 0.05, iterations, normalize_scores)
    result = sinkhorn(scores, beta, 0.05, iterations, normalize_scores=normalize_scores)
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)


def test_defaults_are_the_papers_epsilon_and_rounds(device):
    """sinkhorn(S, beta) is the paper's 3 rounds at epsilon 0.05."""
    scores, beta = random_scores(3, device=device), random_marginal(3, device=device)
    torch.testing.assert_close(sinkhorn(scores, beta), official_sinkhorn(scores, beta, 0.05, 3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_a_prototype_far_below_every_sample_keeps_the_plan_finite(iterations, device):
    """Scores of -10 at epsilon 0.05 put exp(S / eps) below float32's range: the kernel choice must look at
    the most negative score too, not only the largest."""
    scores = random_scores(4, dtype=torch.float32, device=device)
    scores[:, 2] = -10 + 0.1 * scores[:, 3]
    beta = random_marginal(4, device=device)
    result = sinkhorn(scores, beta.float(), 0.05, iterations)
    expected = official_sinkhorn(scores.double(), beta, 0.05, iterations)
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-5)


def test_normalize_scores_gives_an_all_zero_row_zero_scores_as_f_normalize_does(device):
    """F.normalize leaves a zero row zero (its norm is clamped), so that sample gets the uniform row."""
    scores = 3 * random_scores(5, device=device)
    scores[0] = 0
    beta = random_marginal(5, device=device)
    expected = official_sinkhorn(scores, beta, 0.05, 3, normalize_scores=True)
    torch.testing.assert_close(sinkhorn(scores, beta, normalize_scores=True), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("epsilon", [0.1, 0.05, 0.02])
def test_uniform_class_marginal_equals_official_formula(epsilon, device):
    scores = random_scores(3, device=device)
    uniform = torch.full((NUM_PROTOTYPES,), 1 / NUM_PROTOTYPES, dtype=torch.float64, device=device)
    torch.testing.assert_close(
        sinkhorn(scores, None, epsilon, 4), official_sinkhorn(scores, uniform, epsilon, 4), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("iterations", [1, 4])
def test_zero_class_marginal_equals_problem_without_that_prototype(iterations, kernel, device):
    """The official formula is 0/0 for beta_k = 0; the answer is the problem without prototype k."""
    scores, beta = random_scores(3, device=device), random_marginal(3, device=device)
    beta[2] = 0
    kept = [k for k in range(NUM_PROTOTYPES) if k != 2]
    expected = torch.zeros_like(scores)
    expected[:, kept] = official_sinkhorn(scores[:, kept], beta[kept] / beta.sum(), 0.05, iterations)
    torch.testing.assert_close(sinkhorn(scores, beta, 0.05, iterations), expected, rtol=0, atol=1e-6)


def test_log_domain_reference_equals_plain_official_formula():
    """The reference used below for tiny epsilons is itself the official formula."""
    scores, beta = random_scores(5), random_marginal(5)
    for iterations in (1, 3, 7):
        torch.testing.assert_close(
            log_domain_official_sinkhorn(scores, beta, 0.02, iterations),
            official_sinkhorn(scores, beta, 0.02, iterations),
            rtol=0,
            atol=1e-12,
        )


@pytest.mark.parametrize("solver", [pot.sinkhorn, pot.bregman.sinkhorn_log], ids=["sinkhorn", "sinkhorn_log"])
@pytest.mark.parametrize("uniform", [False, True])
def test_converged_plan_matches_pot(solver, uniform, kernel, device):
    scores = random_scores(11, device=device)
    beta = None if uniform else random_marginal(11, device=device)
    target = torch.full((NUM_PROTOTYPES,), 1 / NUM_PROTOTYPES, dtype=torch.float64, device=device) if uniform else beta
    sample_marginal = torch.full((NUM_SAMPLES,), 1 / NUM_SAMPLES, dtype=torch.float64, device=device)
    pot_plan = solver(sample_marginal, target, -scores, 0.05, numItermax=100_000, stopThr=1e-12)
    result = sinkhorn(scores, beta, 0.05, iterations=100_000, tol=1e-12)
    torch.testing.assert_close(result, pot_plan * NUM_SAMPLES, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW_PRECISION])
def test_rows_sum_to_one_and_columns_converge_to_class_marginal(dtype, kernel, device):
    scores = random_scores(4, dtype=dtype, device=device)
    beta = random_marginal(4, device=device)
    plan = sinkhorn(scores, beta, 0.05, iterations=500, tol=1e-6)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert plan.dtype == expected_dtype and plan.shape == scores.shape
    torch.testing.assert_close(plan.sum(1), torch.ones(NUM_SAMPLES, dtype=expected_dtype, device=device))
    assert column_error(plan, beta.to(expected_dtype)) < 1e-5
    assert (plan >= 0).all()


@pytest.mark.parametrize("epsilon", [0.05, 0.01, 0.005, 0.001])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_finite_and_accurate_for_small_epsilon(epsilon, dtype, device):
    scores = random_scores(6, shape=(200, NUM_PROTOTYPES), dtype=dtype, device=device)
    scores[0, 0], scores[1, 1] = 1.0, -1.0  # the extremes of cosine similarity
    beta = random_marginal(6, device=device)
    plan = sinkhorn(scores, beta.to(dtype), epsilon, iterations=3)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(1), torch.ones(200, device=device))
    # Reference: the official rounds in float64 on the same (rounded) inputs.
    expected = log_domain_official_sinkhorn(scores.double(), beta.to(dtype).double() / beta.to(dtype).double().sum(), epsilon, 3)
    torch.testing.assert_close(plan.double(), expected, rtol=0, atol=1e-4 if epsilon >= 0.005 else 1e-3)


@pytest.mark.parametrize(
    "dtype, epsilon, normalize_scores, plain",
    [
        (torch.float32, 0.05, False, True),  # max |S| / eps = 20 <= log(3.4e38) / 4 = 22.2
        (torch.float32, 0.04, False, False),  # 25
        (torch.float16, 0.05, False, True),  # computed in float32
        (torch.float32, 0.05, True, True),  # rows normalised: |S| <= 1 whatever the raw scale
        (torch.float64, 0.01, False, True),  # 100 <= log(1.8e308) / 4 = 177.4
        (torch.float64, 0.005, False, False),  # 200
    ],
)
def test_plain_kernel_runs_where_a_quarter_of_the_exponent_range_bounds_scores(
    dtype, epsilon, normalize_scores, plain, kernel_runs, device
):
    scores = random_scores(15, dtype=torch.float64, device=device)
    scores[0, 0] = 1.0
    scale = 100.0 if normalize_scores else 1.0  # raw |S| up to 100: only the normalised rows are bounded
    scores, beta = (scale * scores).to(dtype), random_marginal(15, device=device)
    plan = sinkhorn(scores, beta, epsilon, 3, normalize_scores=normalize_scores)
    assert kernel_runs == [(not plain, True)]
    expected_scores = F.normalize(scores.double(), dim=1) if normalize_scores else scores.double()
    expected = log_domain_official_sinkhorn(expected_scores, beta, epsilon, 3)
    torch.testing.assert_close(plan.double(), expected, rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-5)


def test_overflowing_plain_kernel_falls_back_to_the_shifted_one(kernel_runs, monkeypatch, device):
    """With the bound lifted, exp(S/eps) overflows (scores up to 1 at eps 0.01, in float32): the plain path
    gives up. Scores within 0.2 of each other keep every shifted entry above exp(-20): the shifted one answers."""
    monkeypatch.setattr(ot_module, "_PLAIN_KERNEL_MAX_LOGIT", {torch.float32: math.inf, torch.float64: math.inf})
    scores = 0.9 + 0.1 * random_scores(16, dtype=torch.float32, device=device)
    scores[0, 0] = 1.0
    beta = random_marginal(16, dtype=torch.float32, device=device)
    plan = sinkhorn(scores, beta, 0.01, 3)
    assert kernel_runs == [(False, False), (True, True)]
    expected = log_domain_official_sinkhorn(scores.double(), beta.double(), 0.01, 3)
    torch.testing.assert_close(plan.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype, epsilon", [(torch.float64, 1e-3), (torch.float32, 5e-3)])
def test_converged_plan_matches_pot_where_the_shifted_kernel_underflows(dtype, epsilon, kernel_runs, device):
    """Scores spanning 2 at these epsilons put shifted kernel entries below the dtype's smallest normal
    number: dropping them from the plan's support (the kernel held exact zeros) made rounds converge to
    another plan, rows of it one-hot on the wrong prototype. The call must go to the log domain instead."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 5, generator=generator, dtype=torch.float64) * 2 - 1
    beta = torch.rand(5, generator=generator, dtype=torch.float64) + 0.1
    beta /= beta.sum()
    plan = sinkhorn(scores.to(device, dtype), beta.to(device, dtype), epsilon, iterations=100_000, tol=1e-7)
    assert kernel_runs == [(True, False)]  # neither scaled kernel answered
    uniform = torch.full((50,), 1 / 50, dtype=torch.float64)
    pot_plan = 50 * pot.bregman.sinkhorn_log(
        uniform, beta, -scores.to(dtype).double(), epsilon, numItermax=100_000, stopThr=1e-12
    )
    torch.testing.assert_close(plan.double().cpu(), pot_plan, rtol=0, atol=1e-3)


def test_small_epsilon_is_where_the_plain_formula_overflows():
    """Guards the meaning of the test above: the official formula is NaN there in float32."""
    scores = random_scores(6, shape=(200, NUM_PROTOTYPES), dtype=torch.float32)
    scores[0, 0] = 1.0
    beta = random_marginal(6, dtype=torch.float32)
    assert not torch.isfinite(official_sinkhorn(scores, beta, 0.01, 3)).all()
    assert torch.isfinite(sinkhorn(scores, beta, 0.01, 3)).all()


def test_autocast_computes_in_float32(device):
    autocast_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    generator = torch.Generator().manual_seed(7)
    embeddings = F.normalize(torch.randn(NUM_SAMPLES, DIM, generator=generator), dim=1).to(device)
    prototypes = F.normalize(torch.randn(NUM_PROTOTYPES, DIM, generator=generator), dim=1).to(device)
    beta = random_marginal(7, dtype=torch.float32, device=device)
    with torch.autocast(device_type=device.type, dtype=autocast_dtype):
        scores = embeddings @ prototypes.t()
        plan = sinkhorn(scores, beta, 0.01, iterations=3)
    assert scores.dtype == autocast_dtype and plan.dtype == torch.float32
    expected = log_domain_official_sinkhorn(scores.double(), beta.double(), 0.01, 3)
    torch.testing.assert_close(plan.double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("marginal_shape", ["none", "shared", "per_item"])
@pytest.mark.parametrize("normalize_scores", [False, True])
def test_batched_equals_per_item_calls(marginal_shape, normalize_scores, kernel, device):
    batch = 3
    scores = random_scores(8, shape=(batch, NUM_SAMPLES, NUM_PROTOTYPES), dtype=torch.float32, device=device)
    beta = {
        "none": None,
        "shared": random_marginal(8, dtype=torch.float32, device=device),
        "per_item": random_marginal(8, batch=(batch,), dtype=torch.float32, device=device),
    }[marginal_shape]
    result = sinkhorn(scores, beta, 0.05, 5, normalize_scores=normalize_scores)
    assert result.shape == scores.shape
    for item in range(batch):
        item_beta = beta[item] if marginal_shape == "per_item" else beta
        expected = sinkhorn(scores[item], item_beta, 0.05, 5, normalize_scores=normalize_scores)
        torch.testing.assert_close(result[item], expected)


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-6])
def test_tolerance_stops_at_first_round_within_tol(tol, kernel, device):
    scores = random_scores(9, device=device)
    beta = random_marginal(9, device=device)
    errors = [column_error(official_sinkhorn(scores, beta, 0.05, rounds), beta) for rounds in range(1, 200)]
    rounds_needed = 1 + next(i for i, error in enumerate(errors) if error < tol)
    result = sinkhorn(scores, beta, 0.05, iterations=200, tol=tol)
    assert column_error(result, beta) < tol
    torch.testing.assert_close(result, official_sinkhorn(scores, beta, 0.05, rounds_needed), rtol=0, atol=1e-9)
    if rounds_needed > 1:  # the round before had not converged, so it did not stop too early
        assert column_error(sinkhorn(scores, beta, 0.05, iterations=rounds_needed - 1), beta) >= tol


def test_tolerance_never_exceeds_iterations(kernel, device):
    scores, beta = random_scores(10, device=device), random_marginal(10, device=device)
    torch.testing.assert_close(
        sinkhorn(scores, beta, 0.05, iterations=2, tol=1e-12), official_sinkhorn(scores, beta, 0.05, 2), rtol=0, atol=1e-9
    )


def extreme_problem(device):
    """A class marginal with a 1e-320 entry and epsilon 1e-4: shifted kernel entries underflow and the
    scaling vectors overflow."""
    scores = random_scores(14, shape=(20, 4), device=device)
    beta = torch.tensor([0.3, 0.3, 0.4, 1e-320], dtype=torch.float64, device=device)
    return scores, beta, 1e-4


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_log_domain_fallback_equals_official_formula(iterations, count_log_domain_calls, device):
    scores, beta, epsilon = extreme_problem(device)
    result = sinkhorn(scores, beta, epsilon, iterations)
    assert len(count_log_domain_calls) == 1
    assert torch.isfinite(result).all()
    expected = log_domain_official_sinkhorn(scores, beta, epsilon, iterations)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("epsilon", [1e-4, 1e-5, 1e-6])
def test_float32_log_domain_fallback_rows_sum_to_one_and_match_float64(epsilon, count_log_domain_calls, device):
    """Logits of 1e4 to 1e6 in float32: the plan must still be a row softmax, not lose mass to rounding."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(100, NUM_PROTOTYPES, generator=generator) * 2 - 1
    beta = torch.rand(NUM_PROTOTYPES, generator=generator) + 0.1
    plan = sinkhorn(scores.to(device), beta.to(device), epsilon, 200)  # enough rounds for the scaling to overflow
    assert len(count_log_domain_calls) == 1
    torch.testing.assert_close(plan.sum(1), torch.ones(100, device=device))
    # Reference: the official rounds in float64 on the same float32 inputs.
    expected = log_domain_official_sinkhorn(scores.double(), beta.double() / beta.double().sum(), epsilon, 200)
    torch.testing.assert_close(plan.double(), expected.to(device), rtol=0, atol=1e-4)


def test_log_domain_fallback_tolerance(count_log_domain_calls, device):
    scores, beta, epsilon = extreme_problem(device)
    tol = 0.15  # converging at epsilon 1e-4 is slow; what matters is where it stops
    errors = [column_error(log_domain_official_sinkhorn(scores, beta, epsilon, rounds), beta) for rounds in range(1, 30)]
    rounds_needed = 1 + next(i for i, error in enumerate(errors) if error < tol)
    assert rounds_needed >= 2, "the fallback only runs from round 2 on"
    result = sinkhorn(scores, beta, epsilon, iterations=30, tol=tol)
    assert len(count_log_domain_calls) == 1
    torch.testing.assert_close(
        result, log_domain_official_sinkhorn(scores, beta, epsilon, rounds_needed), rtol=0, atol=1e-6
    )


def rows_from_potentials(scores, potentials, epsilon):
    """Each row of a plan by its closed form, written out: P_nk = exp(s_nk/eps + g_k) / sum_j exp(s_nj/eps + g_j)."""
    rows = []
    for row in scores.double().tolist():
        logits = [score / epsilon + g for score, g in zip(row, potentials.double().tolist())]
        weights = [math.exp(logit - max(logits)) for logit in logits]  # exp(-inf) = 0: a column without mass
        rows.append([weight / sum(weights) for weight in weights])
    return torch.tensor(rows, dtype=torch.float64)


def assert_centred(potentials):
    """Mean 0 over the finite entries, to the rounding of their dtype."""
    finite = potentials[torch.isfinite(potentials)]
    scale = max(1.0, float(finite.abs().max()))
    assert abs(float(finite.double().mean())) < 8 * torch.finfo(potentials.dtype).eps * scale


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_potentials_rebuild_every_row_of_the_plan(iterations, kernel, device):
    scores = random_scores(17, shape=(30, 5), device=device)
    beta = torch.tensor([0.4, 0.3, 0.0, 0.2, 0.1], dtype=torch.float64, device=device)
    plan, potentials = sinkhorn(scores, beta, 0.05, iterations, return_potentials=True)
    assert torch.equal(plan, sinkhorn(scores, beta, 0.05, iterations))  # the same plan as without them
    assert potentials.shape == (5,) and potentials.dtype == torch.float64 and potentials[2] == -math.inf
    assert_centred(potentials.cpu())
    torch.testing.assert_close(rows_from_potentials(scores.cpu(), potentials.cpu(), 0.05), plan.cpu(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("iterations", [1, 3])
def test_potentials_of_the_per_sample_rebuilt_kernel_rebuild_its_plan(iterations, monkeypatch, device):
    """Small epsilon in float32: a sample 35 logits below every column max (all scores within 0.45, so
    no entry underflows) makes round 1 rebuild its kernel with per-sample shifts (a second _logits pass);
    the potentials must still give every row."""
    logits_calls = []
    original = ot_module._logits
    monkeypatch.setattr(ot_module, "_logits", lambda *args, **kwargs: logits_calls.append(1) or original(*args, **kwargs))
    scores = 0.55 + 0.05 * random_scores(19, shape=(60, 5), dtype=torch.float32, device=device)
    scores[0] = 0.15
    beta = random_marginal(19, 5, dtype=torch.float32, device=device)
    plan, potentials = sinkhorn(scores, beta, 0.01, iterations, return_potentials=True)
    assert len(logits_calls) == 2  # the rebuild ran
    expected = log_domain_official_sinkhorn(scores.double(), beta.double(), 0.01, iterations)
    torch.testing.assert_close(plan.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(rows_from_potentials(scores.cpu(), potentials.cpu(), 0.01), plan.cpu().double(),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("iterations", [2, 5])
def test_log_domain_fallback_potentials_rebuild_its_plan(iterations, count_log_domain_calls, device):
    scores, beta, epsilon = extreme_problem(device)
    plan, potentials = sinkhorn(scores, beta, epsilon, iterations, return_potentials=True)
    assert len(count_log_domain_calls) == 1
    assert_centred(potentials.cpu())
    torch.testing.assert_close(rows_from_potentials(scores.cpu(), potentials.cpu(), epsilon), plan.cpu(), rtol=0, atol=1e-9)


def test_batched_potentials_of_normalised_scores_in_float32_with_early_stop(device):
    scores = random_scores(18, shape=(2, 25, 4), dtype=torch.float32, device=device) * 3
    plan, potentials = sinkhorn(scores, None, 0.1, 50, normalize_scores=True, tol=1e-4, return_potentials=True)
    assert potentials.shape == (2, 4) and potentials.dtype == torch.float32
    for item in range(2):
        assert_centred(potentials[item].cpu())
        expected = rows_from_potentials(F.normalize(scores[item].cpu().double(), dim=1), potentials[item].cpu(), 0.1)
        torch.testing.assert_close(plan[item].cpu().double(), expected, rtol=0, atol=1e-5)


def test_marginal_is_normalised_and_inputs_untouched(device):
    scores, beta = random_scores(13, dtype=torch.float32, device=device), random_marginal(13, dtype=torch.float32, device=device)
    scores.requires_grad_(True)
    scores_before, beta_before = scores.detach().clone(), beta.clone()
    result = sinkhorn(scores, 5 * beta, 0.05, 3, normalize_scores=True)
    assert not result.requires_grad
    torch.testing.assert_close(result, sinkhorn(scores, beta, 0.05, 3, normalize_scores=True))
    assert torch.equal(scores.detach(), scores_before) and torch.equal(beta, beta_before)


def test_class_marginal_accepts_a_list():
    scores, beta = random_scores(14), random_marginal(14)
    torch.testing.assert_close(sinkhorn(scores, beta.tolist()), sinkhorn(scores, beta))


SCORES = torch.rand(5, 3)


@pytest.mark.parametrize(
    "kwargs, error, argument",
    [
        ({"scores": SCORES.tolist()}, TypeError, "scores"),
        ({"scores": torch.ones(5, 3, dtype=torch.long)}, TypeError, "scores"),
        ({"scores": torch.rand(5)}, ValueError, "scores"),
        ({"scores": torch.rand(2, 2, 5, 3)}, ValueError, "scores"),
        ({"scores": torch.rand(0, 3)}, ValueError, "scores"),
        ({"scores": torch.rand(0, 5, 3)}, ValueError, "scores"),
        ({"epsilon": 1e-40}, ValueError, "scores / epsilon"),
        ({"normalize_scores": "False"}, TypeError, "normalize_scores"),
        ({"normalize_scores": 1}, TypeError, "normalize_scores"),
        ({"return_potentials": 1}, TypeError, "return_potentials"),
        ({"scores": torch.tensor([[0.1, float("nan")], [0.2, 0.3]])}, ValueError, "scores"),
        ({"scores": torch.tensor([[0.1, float("inf")], [0.2, 0.3]])}, ValueError, "scores"),
        ({"epsilon": 0.0}, ValueError, "epsilon"),
        ({"epsilon": -0.05}, ValueError, "epsilon"),
        ({"epsilon": float("nan")}, ValueError, "epsilon"),
        ({"epsilon": "0.05"}, TypeError, "epsilon"),
        ({"iterations": 0}, ValueError, "iterations"),
        ({"iterations": 2.0}, TypeError, "iterations"),
        ({"iterations": True}, TypeError, "iterations"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"tol": "small"}, TypeError, "tol"),
        ({"class_marginal": torch.tensor([0.5, 0.7, -0.2])}, ValueError, "class_marginal"),
        ({"class_marginal": torch.tensor([0.5, 0.5])}, ValueError, "class_marginal"),
        ({"class_marginal": torch.zeros(3)}, ValueError, "class_marginal"),
        ({"class_marginal": torch.tensor([0.5, float("nan"), 0.5])}, ValueError, "class_marginal"),
        ({"class_marginal": torch.ones(2, 3)}, ValueError, "class_marginal"),
        ({"scores": torch.rand(2, 5, 3), "class_marginal": torch.ones(4, 3)}, ValueError, "class_marginal"),
        ({"class_marginal": "uniform"}, TypeError, "class_marginal"),
    ],
)
def test_bad_input_raises_naming_the_argument(kwargs, error, argument):
    arguments = {"scores": SCORES, **kwargs}
    with pytest.raises(error, match=argument):
        sinkhorn(**arguments)


def test_non_tensor_scores_are_named_by_their_type():
    with pytest.raises(TypeError, match="scores must be a floating-point torch.Tensor, got ndarray"):
        sinkhorn(SCORES.numpy())
    with pytest.raises(TypeError, match="got dtype torch.int64"):
        sinkhorn(torch.ones(3, 2, dtype=torch.long))


def test_one_call_reads_the_device_three_times_the_memorys_path_twice(monkeypatch):
    """On a GPU every read of a device value waits for the queued work; training runs Sinkhorn D**2
    times a step. One read each for the score range, the class marginal and the scalings' finiteness;
    the memory's path (``_trusted_sinkhorn``) takes its own marginal unread."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k: reads.append(_n) or
                            _f(self, *a, **k))
    scores, beta = random_scores(3), random_marginal(3)
    sinkhorn(scores, beta, 0.05, iterations=3)
    assert reads == ["tolist", "tolist", "tolist"]
    reads.clear()
    _trusted_sinkhorn(scores, beta, 0.05, 3, False, rows=torch.tensor([0, 3]), rescore=scores.clone)
    assert reads == ["tolist", "tolist"]


@pytest.mark.parametrize("num_prototypes", [7, 40], ids=["prototype-major", "sample-major"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("epsilon, normalize_scores", [(0.1, False), (0.05, True), (0.01, False)],
                         ids=["plain", "plain-normalised", "shifted"])
def test_trusted_sinkhorn_is_sinkhorn_bit_for_bit_and_its_rows_are_the_plans_rows(
        num_prototypes, dtype, epsilon, normalize_scores, kernel_runs, device):
    """The memory's path: the same plan and potentials, bit for bit, also when it builds the plain kernel
    in the scores' memory (``rescore``) or scales only the rows asked for."""
    scores = random_scores(21, shape=(60, num_prototypes), dtype=dtype, device=device)
    beta = random_marginal(21, num_prototypes, dtype=torch.float32, device=device)
    expected, potentials = sinkhorn(scores, beta, epsilon, 3, normalize_scores=normalize_scores, return_potentials=True)
    rows = torch.tensor([5, 0, 59, 5], device=device)
    for options in ({}, {"rescore": scores.clone}, {"rows": rows}, {"rows": rows, "rescore": scores.clone}):
        plan, g = _trusted_sinkhorn(scores.clone(), beta, epsilon, 3, normalize_scores, return_potentials=True,
                                   **options)
        assert torch.equal(plan, expected[rows] if "rows" in options else expected), options
        assert torch.equal(g, potentials), options
    # the kernel the bound picks: plain up to a quarter of the compute dtype's exponent range
    largest_logit = (1.0 if normalize_scores else scores.abs().max().item()) / epsilon
    shifted = largest_logit > ot_module._PLAIN_KERNEL_MAX_LOGIT[torch.promote_types(dtype, torch.float32)]
    assert {shift for shift, _ in kernel_runs} == {shifted}
    assert shifted == (epsilon == 0.01 and dtype != torch.float64)  # each path was the one meant


def test_trusted_sinkhorn_rows_of_the_log_domain_fallback_are_its_plans_rows(count_log_domain_calls, device):
    scores, beta, epsilon = extreme_problem(device)
    rows = torch.tensor([3, 19], device=device)
    expected = sinkhorn(scores, beta, epsilon, 3)
    assert torch.equal(_trusted_sinkhorn(scores, beta, epsilon, 3, False, rows=rows), expected[rows])
    assert len(count_log_domain_calls) == 2


def test_trusted_sinkhorn_rescores_for_the_fallback_when_the_plain_kernel_consumed_the_scores(
        monkeypatch, kernel_runs, device):
    """A plain try that fails (here: forced) has overwritten the scores with its kernel: the shifted try
    must start from ``rescore()``'s scores, and so gives the plan ``sinkhorn`` falls back to."""
    scores = random_scores(22, shape=(50, 30), dtype=torch.float32, device=device)
    beta = random_marginal(22, 30, dtype=torch.float32, device=device)
    original, fail_once = ot_module._finite_scalings, []
    monkeypatch.setattr(ot_module, "_finite_scalings",
                        lambda u, v: original(u, v) and not (fail_once and fail_once.pop()))
    fail_once.append(True)
    expected = sinkhorn(scores, beta, 0.1, 3)
    assert kernel_runs == [(False, False), (True, True)]
    consumed, made = scores.clone(), []
    fail_once.append(True)
    plan = _trusted_sinkhorn(consumed, beta, 0.1, 3, False, rescore=lambda: made.append(1) or scores.clone())
    assert not torch.equal(consumed, scores)  # the plain try's kernel is where the scores were
    assert made == [1] and torch.equal(plan, expected)
    assert kernel_runs[2:] == [(False, False), (True, True)]


def test_the_public_sinkhorn_never_writes_its_scores(device):
    for num_prototypes in (7, 40):  # both kernel layouts
        scores = random_scores(23, shape=(30, num_prototypes), dtype=torch.float32, device=device)
        before = scores.clone()
        sinkhorn(scores, epsilon=0.1)
        _trusted_sinkhorn(scores, torch.ones(num_prototypes, device=device), 0.1, 3, False)  # no rescore: no writes
        assert torch.equal(scores, before)
