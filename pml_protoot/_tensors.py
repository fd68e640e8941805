"""The dtype and device rules every module follows.

Computation runs in float32 at least: float64 stays float64, half precision (float16,
bfloat16) is upcast, because Sinkhorn's scaling, L2 normalisation and P@k's ranking lose
too much in 8-bit or 11-bit mantissas. Models get their inputs in the dtype of their
floating-point parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for a float64 ``tensor``, float32 for any other."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


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
