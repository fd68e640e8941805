"""Entropic optimal transport between samples and prototypes (ProtoOT's assignment step)."""
from __future__ import annotations

import contextlib
import math

import torch

from ._checks import check_bool, check_finite, check_number, check_positive_int
from ._tensors import compute_dtype

__all__ = ["sinkhorn"]


def sinkhorn(
    scores: torch.Tensor,
    class_marginal: torch.Tensor | None = None,
    epsilon: float = 0.05,
    iterations: int = 3,
    *,
    normalize_scores: bool = False,
    tol: float | None = None,
    return_potentials: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Soft-assign N samples to K prototypes under a class marginal (SwAV/ProtoOT Sinkhorn).

    Solves, by ``iterations`` rounds of Sinkhorn-Knopp scaling, the entropic transport
    problem

    .. math::

        \max_{Q \in \mathcal{U}} \ \langle Q, S \rangle + \varepsilon H(Q), \qquad
        \mathcal{U} = \{ Q \in \mathbb{R}_+^{N \times K} :
                         Q \mathbf{1}_K = \tfrac{1}{N}\mathbf{1}_N,\;
                         Q^\top \mathbf{1}_N = \beta \}

    whose solution is :math:`Q = \operatorname{diag}(u)\, e^{S/\varepsilon} \operatorname{diag}(v)`,
    and returns :math:`P = N Q`: every row of ``P`` sums to 1 and column ``k`` sums to
    :math:`N \beta_k` once converged. Each round first scales prototype columns to
    :math:`\beta` and then sample rows to :math:`1/N`, exactly as the official ProtoOT
    (and SwAV) code does, so a fixed number of rounds gives the official result.

    Unlike the official formula (``exp(S / epsilon)`` then repeated division of the whole
    plan), rounds only update the scaling vectors ``u, v`` of
    :math:`Q = \operatorname{diag}(u)\, W \operatorname{diag}(v)` (two matrix-vector
    products a round) and the plan is formed once at the end. While
    :math:`\max |S| / \varepsilon` is at most a quarter of the compute dtype's exponent
    range (22.2 in float32: cosine scores with :math:`\varepsilon \ge 0.046`, ProtoOT's
    0.05 included; 177 in float64), ``W`` is the plain kernel :math:`e^{S/\varepsilon}`:
    nothing can overflow, the arithmetic is the official one and the operations fewest.
    Beyond that, round 1 builds a kernel :math:`W = e^{S/\varepsilon - c}` shifted by its
    column log-sum-exp ``c`` (so nothing overflows while ``scores / epsilon`` itself is finite) in a single
    N x K buffer. If an entry of that kernel underflows (scores in a column spanning more
    than about :math:`87\varepsilon` in float32, :math:`708\varepsilon` in float64: converged rounds
    would solve the problem without those cells), or a scaling vector under- or overflows (an extreme
    class marginal, e.g. :math:`\beta_k < 10^{-38}` in float32 with tiny ``epsilon``), the call
    falls back: from the plain kernel to the shifted one, from the shifted one to plain log-domain rounds.

    Args:
        scores: ``(N, K)`` or batched ``(B, N, K)`` similarities of samples to prototypes.
            Any floating dtype; computation is in float32 (float64 for float64 input)
            with autocast disabled.
        class_marginal: ``(K,)`` or ``(B, K)`` non-negative prototype masses
            :math:`\beta`, normalised to sum to 1; uniform when ``None``.
        epsilon: entropic regularisation :math:`\varepsilon > 0`; the default 0.05 is the
            paper's, as the official code uses it. ``PrototypeMemory`` passes its own
            ``epsilon``, 0.1 by default (measured better on pacs-mini, see ``docs/differences.md``).
        iterations: number of Sinkhorn rounds (the maximum when ``tol`` is given).
        normalize_scores: L2-normalise each row of ``scores`` first, as the official
            code does (``F.normalize(M C^T, dim=1)``).
        tol: stop early once every column sum of ``Q`` is within ``tol`` of
            :math:`\beta` (L-infinity); ``None`` runs exactly ``iterations`` rounds.
        return_potentials: also return the column potentials :math:`g`. Every round ends by
            scaling sample rows, so any number of rounds leaves
            :math:`P_n = \mathrm{softmax}(x_n + g)` with :math:`x = S / \varepsilon` (rows of
            ``S`` normalised first with ``normalize_scores``) and :math:`g = \log v` plus the
            round-1 column factors: rows of the plan for new scores follow in :math:`O(K)` each.

    Returns:
        ``P`` with the shape of ``scores``, float32 (float64 for float64 input), no gradient;
        with ``return_potentials``, ``(P, g)``: ``g`` of shape ``(K,)`` or ``(B, K)`` in ``P``'s
        dtype, mean 0 over the columns that carry mass and ``-inf`` on those that carry none
        (:math:`\beta_k = 0`).

    Raises:
        TypeError: ``scores`` is not a floating tensor; ``epsilon``/``tol`` are not real
            numbers; ``iterations`` is not an integer; ``normalize_scores`` or
            ``return_potentials`` is not a bool; ``class_marginal`` is not numeric.
        ValueError: bad or empty shapes, non-finite scores, ``epsilon <= 0``, ``scores / epsilon``
            beyond the compute dtype's range, ``iterations`` below 1, ``tol <= 0``,
            or a negative/all-zero/mis-shaped ``class_marginal``.

    Example:
        >>> import torch
        >>> from pml_protoot.ot import sinkhorn
        >>> _ = torch.manual_seed(0)
        >>> scores = torch.rand(6, 3) * 2 - 1  # cosine similarities
        >>> P = sinkhorn(scores, torch.tensor([0.5, 0.25, 0.25]), iterations=1000, tol=1e-6)
        >>> torch.allclose(P.sum(1), torch.ones(6))
        True
        >>> torch.allclose(P.sum(0), torch.tensor([3.0, 1.5, 1.5]), atol=1e-4)
        True
        >>> P, g = sinkhorn(scores, iterations=3, return_potentials=True)
        >>> torch.allclose(P, torch.softmax(scores / 0.05 + g, dim=1), atol=1e-6)
        True
    """
    largest_logit = _check_arguments(scores, epsilon, iterations, normalize_scores, tol)
    check_bool("return_potentials", return_potentials)
    with _exact_arithmetic(scores.device):
        beta, has_zero = _class_marginal(class_marginal, scores)
        return _solve(scores, beta, beta == 0 if has_zero else None, epsilon, iterations, normalize_scores,
                      largest_logit, tol=tol, potentials=return_potentials)


def _trusted_sinkhorn(
    scores: torch.Tensor,
    class_marginal: torch.Tensor,
    epsilon: float,
    iterations: int,
    normalize_scores: bool,
    *,
    return_potentials: bool = False,
    rows: torch.Tensor | None = None,
    rescore=None,
):
    """:func:`sinkhorn` of ``(N, K)`` scores under a ``(K,)`` ``class_marginal`` that the caller vouches for
    (finite, non-negative, not all zero: it is normalised but not read back), the same arithmetic bit for
    bit, with two savings for a caller that makes its scores: ``rows`` (``(B,)`` long) returns only those
    rows of the plan, without scaling the other ``N - B``; ``rescore`` (a function making the same scores
    anew) lets the plain kernel be built in the memory of ``scores``, which are then overwritten, and
    ``rescore()`` gives a fallback its own.
    """
    largest_logit = _check_arguments(scores, epsilon, iterations, normalize_scores, None)
    with _exact_arithmetic(scores.device):
        beta = _normalised_marginal(class_marginal.to(compute_dtype(scores)))
        return _solve(scores, beta, beta == 0, epsilon, iterations, normalize_scores, largest_logit,
                      potentials=return_potentials, rows=rows, rescore=rescore)


@contextlib.contextmanager
def _exact_arithmetic(device: torch.device):
    """No autograd and no autocast: the plan is a target, computed in float32 at least."""
    autocast = torch.is_autocast_enabled(device.type)
    with torch.no_grad(), (
        torch.autocast(device_type=device.type, enabled=False) if autocast else contextlib.nullcontext()
    ):
        yield


def _solve(scores, beta, zero_mass, epsilon, iterations, normalize_scores, largest_logit, *, tol=None,
           potentials=False, rows=None, rescore=None):
    """The plan (rows ``rows`` only, if given) and, with ``potentials``, the centred column potentials:
    the plain kernel while ``largest_logit`` allows it, else (or should it under/overflow) the shifted
    one, else log-domain rounds. ``beta`` is the normalised (..., K, 1) marginal, ``zero_mass`` its
    zero entries (None when there are none)."""
    arguments = (beta, zero_mass, epsilon, iterations, normalize_scores, tol, potentials, rows)
    solved = None
    if largest_logit <= _PLAIN_KERNEL_MAX_LOGIT[compute_dtype(scores)]:
        solved = _scaled_sinkhorn(scores, *arguments, shift=False, overwrite=rescore is not None)
        if solved is None and rescore is not None:  # the failed try consumed the scores
            scores = rescore()
    if solved is None:
        solved = _scaled_sinkhorn(scores, *arguments, shift=True, overwrite=False)
    if solved is None:
        plan, g = _log_domain_sinkhorn(scores, beta.mT.log(), epsilon, iterations, normalize_scores, tol)
        solved = (plan if rows is None else plan[rows]), g
    plan, g = solved
    return (plan, _centred(g)) if potentials else plan


def _centred(potentials: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` potentials less their mean over the finite entries (a column without mass stays -inf)."""
    finite = torch.isfinite(potentials)
    mean = torch.where(finite, potentials, 0).sum(-1, keepdim=True) / finite.sum(-1, keepdim=True)
    return potentials - mean


def _check_arguments(scores, epsilon, iterations, normalize_scores, tol) -> float:
    """Raise on bad arguments; return the largest logit, ``max |scores| / epsilon``."""
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        given = f"dtype {scores.dtype}" if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise TypeError(f"scores must be a floating-point torch.Tensor, got {given}")
    if scores.dim() not in (2, 3) or scores.numel() == 0:
        raise ValueError(f"scores must have shape (N, K) or (B, N, K) with B, N, K > 0, got {tuple(scores.shape)}")
    # one pass and one sync give both the range and finiteness (min and max propagate NaN)
    smallest, largest = torch.stack(torch.aminmax(scores)).tolist()
    if not math.isfinite(smallest + largest):
        check_finite("scores", scores)
    check_number("epsilon", epsilon, low=0, strict=True)
    check_positive_int("iterations", iterations)
    if tol is not None:
        check_number("tol", tol, low=0, strict=True)
    # Normalised rows score at most 1 in absolute value.
    largest_logit = (1.0 if check_bool("normalize_scores", normalize_scores) else max(-smallest, largest)) / epsilon
    if largest_logit > torch.finfo(compute_dtype(scores)).max:
        raise ValueError(
            f"scores / epsilon must be finite in {compute_dtype(scores)}, got max |scores| / epsilon = "
            f"{largest_logit:.3g} (epsilon {epsilon}): use a larger epsilon or float64 scores"
        )
    return largest_logit


def _finite_scalings(u: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the scaling vectors are finite, in one device sync (their sums, added in Python's float64)."""
    return math.isfinite(sum(torch.stack([u.sum(), v.sum()]).tolist()))


def _class_marginal(class_marginal, scores: torch.Tensor):
    """Return ``(beta, has_zero)``: beta shaped (..., K, 1), normalised, in the compute dtype."""
    num_prototypes = scores.shape[-1]
    dtype = compute_dtype(scores)
    if class_marginal is None:
        return torch.full((num_prototypes, 1), 1.0 / num_prototypes, dtype=dtype, device=scores.device), False
    try:
        beta = torch.as_tensor(class_marginal, dtype=dtype, device=scores.device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"class_marginal must be a tensor or sequence of K = {num_prototypes} numbers, got {class_marginal!r}"
        ) from err
    batch_shape = tuple(scores.shape[:-2])
    if beta.shape not in ((num_prototypes,), batch_shape + (num_prototypes,)):
        raise ValueError(
            f"class_marginal must have shape (K,) or (B, K) = {batch_shape + (num_prototypes,)}, got {tuple(beta.shape)}"
        )
    total = beta.sum(-1, keepdim=True)
    # min entry (NaN fails ">= 0"), min total (> 0) and finiteness (entries >= 0, so of the largest total),
    # read in one device sync
    smallest, smallest_total, largest_total = torch.stack([beta.amin(), total.amin(), total.amax()]).tolist()
    if not (smallest >= 0 and smallest_total > 0 and math.isfinite(largest_total)):
        raise ValueError(
            "class_marginal must be finite, non-negative and not all zero, "
            f"got min {beta.min().item():.3g} and sum {beta.sum().item():.3g}"
        )
    return _normalised_marginal(beta), smallest == 0


def _normalised_marginal(beta: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` masses divided by their sum, shaped ``(..., K, 1)``."""
    return (beta / beta.sum(-1, keepdim=True)).unsqueeze(-1)


def _logits(scores: torch.Tensor, epsilon: float, normalize_scores: bool, out=None) -> torch.Tensor:
    """``scores / epsilon`` in the compute dtype (rows L2-normalised first if asked), into ``out``."""
    dtype = compute_dtype(scores)
    if out is None:
        out = torch.empty(scores.shape, dtype=dtype, device=scores.device)
    divisor = epsilon
    if normalize_scores:  # as F.normalize(scores, dim=-1)
        norms = torch.linalg.vector_norm(scores, dim=-1, keepdim=True, dtype=dtype)
        divisor = norms.clamp_min(1e-12).mul_(epsilon)
    if scores.dtype == dtype:
        return torch.div(scores, divisor, out=out)
    return out.copy_(scores).div_(divisor)  # upcast first: the quotient needs float32 precision


# The unshifted kernel exp(S / eps) is used up to this max |S| / eps: a quarter of the
# exponent range, so kernel entries (e^{+-x}), their sums over a million samples and the
# scaling vectors (within about e^{+-2x} of their scale) stay far from under- and overflow.
_PLAIN_KERNEL_MAX_LOGIT = {dtype: math.log(torch.finfo(dtype).max) / 4 for dtype in (torch.float32, torch.float64)}


# Up to this many prototypes the kernel is stored prototype-major (K, N): with few
# prototypes, reductions over samples on the (N, K) layout are strided and slow.
_PROTOTYPE_MAJOR_MAX_K = 16

# Round-1 kernel rows whose largest entry is below exp(-27) are rebuilt exactly: beyond
# that, entries lost to underflow when shifting by the column max could matter.
_MIN_ROW_MAX = math.exp(-27.0)


def _round_one_kernel(scores, beta, epsilon, normalize_scores, shift, potentials, overwrite):
    """Return ``W^T`` (..., K, N) up to a per-sample factor, its sample sums, and, with ``potentials``,
    ``log f`` (..., K, 1) (else None): ``W = exp(S/eps) diag(f)`` with ``f = beta / column sums`` of
    ``exp(S/eps - c)``, times ``exp(-c)``.

    ``c`` is 0 without ``shift``. None with ``shift`` when an entry of ``W`` underflowed, leaving the support.
    With ``overwrite`` (and no ``shift``), a sample-major kernel is built in the memory of ``scores``.

    Round 1 scales columns to ``beta``: ``c_k = logsumexp_n(S_nk/eps) - log(beta_k)``. With
    ``shift``, shifting by the column max makes every ``exp`` safe and needs one N x K buffer;
    samples lying far below every column max (tiny ``epsilon``) are instead rebuilt in that
    buffer, stabilised per sample. Without, ``exp(S/eps)`` is taken as is (the caller knows it
    cannot overflow): two passes and a sync fewer. With few prototypes the buffer is
    prototype-major so that every reduction over samples reads contiguous memory.
    """
    dtype = compute_dtype(scores)
    if scores.shape[-1] <= _PROTOTYPE_MAJOR_MAX_K:
        shape = scores.shape[:-2] + (scores.shape[-1], scores.shape[-2])
        kernel = torch.empty(shape, dtype=dtype, device=scores.device)
        _logits(scores, epsilon, normalize_scores, out=kernel.mT)
    else:  # many prototypes: reductions over samples vectorise anyway, a transposing copy would not pay
        # In place, the N x K buffer is not allocated anew (on a CPU, fresh pages cost as much as the
        # division); only without shift: the shifted path reads the scores again.
        in_place = overwrite and not shift and scores.dtype == dtype
        kernel = _logits(scores, epsilon, normalize_scores, out=scores if in_place else None).mT
    if shift:
        column_max = kernel.amax(dim=-1, keepdim=True)  # (..., K, 1)
        kernel.sub_(column_max)
    kernel.exp_()
    column_sum = kernel.sum(dim=-1, keepdim=True)
    kernel.mul_(beta / column_sum)
    sample_sum = kernel.sum(dim=-2, keepdim=True)  # (..., 1, N)
    if not shift:  # no underflow below the caller's bound
        return kernel, sample_sum, beta.log() - column_sum.log() if potentials else None  # -inf where beta_k = 0
    # max over prototypes >= sum / K: the exact max is needed only when some sum is small
    rebuild = not (
        sample_sum.amin().item() >= scores.shape[-1] * _MIN_ROW_MAX or kernel.amax(dim=-2).min() >= _MIN_ROW_MAX
    )
    log_shift = column_max + column_sum.log() - beta.log()  # the kernel is exp(S/eps - log_shift)
    if rebuild:  # the same columns, rebuilt with per-sample shifts (absorbed by the row scaling)
        _logits(scores, epsilon, normalize_scores, out=kernel.mT).sub_(log_shift.mT)
        kernel.sub_(kernel.amax(dim=-2, keepdim=True)).exp_()
        sample_sum = kernel.sum(dim=-2, keepdim=True)
    # An entry that underflowed (or lost precision as a subnormal) has left the plan's support: later
    # rounds would converge to the plan on what is left, far from the true one with enough rounds.
    if torch.where(beta > 0, kernel, torch.inf).amin() < torch.finfo(dtype).tiny:
        return None
    return kernel, sample_sum, -log_shift if potentials else None


def _scaled_sinkhorn(scores, beta, zero_mass, epsilon, iterations, normalize_scores, tol, potentials, rows, *,
                     shift, overwrite):
    """Scaling-vector Sinkhorn on a round-1 kernel (column-shifted if ``shift``): ``(plan, g)`` (g uncentred,
    ``(..., K)``, with ``potentials``; else None), or ``None`` if it under/overflows. With ``rows``, the
    plan holds those rows only.

    The plan is ``diag(u) W diag(v)`` throughout; each later round costs two
    matrix-vector products instead of rewriting the N x K plan.
    """
    round_one = _round_one_kernel(scores, beta, epsilon, normalize_scores, shift, potentials, overwrite)
    if round_one is None:
        return None
    kernel, sample_sum, log_factor = round_one
    num_samples = kernel.shape[-1]
    # u holds N times the row scaling (so P = diag(u) W diag(v) directly) and v is computed
    # from N * beta: no per-round multiplication by N.
    u = sample_sum.reciprocal_()  # round 1, samples to 1/N; (..., 1, N)
    v = None  # (..., K, 1); all ones after round 1
    scaled_beta = beta * num_samples
    for _ in range(iterations - 1):
        column_mass = torch.matmul(kernel, u.mT)  # (..., K, 1), N times the true mass
        if tol is not None:
            error = column_mass / num_samples if v is None else column_mass * v / num_samples
            if error.sub_(beta).abs().max() < tol:
                break
        v = torch.div(scaled_beta, column_mass)
        if zero_mass is not None:
            v.masked_fill_(zero_mass, 0.0)
        u = torch.matmul(v.mT, kernel).reciprocal_()
        # non-finite u or v propagates to the last round (u, v >= 0): one sync at the end
        if tol is not None and not _finite_scalings(u, v):
            return None
    if v is not None and tol is None and not _finite_scalings(u, v):
        return None
    g = None if log_factor is None else log_factor.squeeze(-1) + (0 if v is None else v.squeeze(-1).log())
    if rows is not None:  # the same products as below, (W_nk v_k) u_n, on the rows asked for only
        plan = kernel.mT[rows]
        if v is not None:
            plan.mul_(v.mT)
        return plan.mul_(u.mT[rows]), g
    if v is not None:  # prototype-major: scaling rows of (K, N) reads contiguous memory
        kernel.mul_(v)
    plan = kernel.mT
    if plan.is_contiguous():  # sample-major kernel: scale in place
        return plan.mul_(u.mT), g
    # prototype-major: the last scaling also transposes into a fresh (N, K) plan
    return torch.mul(plan, u.mT, out=torch.empty(plan.shape, dtype=plan.dtype, device=plan.device)), g


def _log_domain_sinkhorn(scores, log_beta, epsilon, iterations, normalize_scores, tol):
    """Plain log-domain Sinkhorn, ``(plan, g)``: slower, never under/overflows.

    ``f`` (..., N, 1) and ``g`` (..., 1, K) are the row and column log-potentials of
    ``Q = exp(logits + f + g)``.
    """
    logits = _logits(scores, epsilon, normalize_scores)
    log_n = math.log(logits.shape[-2])
    f = torch.zeros_like(logits[..., :1])
    g = torch.zeros_like(logits[..., :1, :])
    for round_index in range(iterations):
        log_columns = torch.logsumexp(logits + f, dim=-2, keepdim=True)
        if tol is not None and round_index > 0 and ((log_columns + g).exp() - log_beta.exp()).abs().max() < tol:
            break
        g = log_beta - log_columns
        f = -log_n - torch.logsumexp(logits + g, dim=-1, keepdim=True)
    # Every completed round ends with f = -log N - logsumexp_k(logits + g), so P = N Q is the
    # row softmax of logits + g. Forming it so keeps rows summing to 1 to rounding: summing
    # logits, f and g (each up to |S| / epsilon, e.g. 1e6) in float32 would lose about 0.06
    # in the exponent and up to 8 % of a row's mass.
    return torch.softmax(logits + g, dim=-1), g.squeeze(-2)
