"""The dtype and device rules every module follows.

Computation runs in float32 at least: float64 stays float64, half precision (float16,
bfloat16) is upcast, because Sinkhorn's scaling, L2 normalisation and P@k's ranking lose
too much in 8-bit or 11-bit mantissas. Models get their inputs in the dtype of their
floating-point parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any of ``tensors`` is float64, float32 otherwise (half precision included)."""
    return torch.float64 if any(tensor.dtype == torch.float64 for tensor in tensors) else torch.float32


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in :func:`compute_dtype` (half precision upcast, float64 kept)."""
    return tensor.to(compute_dtype(tensor))


def unit_rows(tensor: torch.Tensor) -> torch.Tensor:
    r"""``(N, D)`` rows divided by their L2 norm, :math:`x_i / \max(\lVert x_i \rVert_2, 10^{-12})`,
    in float32 at least: in float16 the ``1e-12`` floor underflows, and a zero row would become
    NaN instead of staying zero."""
    return F.normalize(at_least_float32(tensor), dim=1)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives; the CPU for a parameter-free model."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def floating_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s floating-point parameters when they share one; None when they do not
    (a frozen float64 scalar before float32 layers: inputs are then left as they are) or there are none."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype`` when both are floating point; integer tensors (``uint8`` images) as they are."""
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def sum_rows_by_group(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    r"""``(G, D)`` sums :math:`S_g = \sum_{n:\, g_n = g} v_n` of the ``(N, D)`` rows of ``values`` by their
    ``(N,)`` groups in ``[0, G)``, in ``values``' dtype and on its device, the same bits on every call.

    On the CPU by ``index_add_``; elsewhere by a one-hot product, :math:`S = \mathbb{1}[g_n = g]^\top V`
    (:math:`O(NGD)`), because CUDA's ``index_add_`` adds with atomics in whatever order the threads
    run (deterministic only under ``torch.use_deterministic_algorithms``).
    """
    if values.device.type == "cpu":
        return values.new_zeros(num_groups, values.shape[1]).index_add_(0, groups, values)
    return one_hot_row_sums(values, groups, num_groups)


def one_hot_row_sums(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """:func:`sum_rows_by_group` as one matrix product on any device (what it runs off the CPU).

    The product runs in float64 (float32 on MPS, which has none): a float32 one would follow
    ``torch.backends.cuda.matmul.allow_tf32`` down to a 10-bit mantissa.
    """
    work_dtype = torch.float32 if values.device.type == "mps" else torch.float64
    return (one_hot_mask(groups, num_groups).to(work_dtype).T @ values.to(work_dtype)).to(values.dtype)


def one_hot_mask(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(N, C)`` bool mask, true at ``[n, classes[n]]``: ``F.one_hot(classes, num_classes).bool()`` without
    its range checks, which read the device (two syncs a call) and run every step where this is used."""
    return classes[:, None] == torch.arange(num_classes, device=classes.device)
