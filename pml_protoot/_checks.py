"""Input validation shared by every public class.

Each helper raises ``TypeError``/``ValueError`` naming the argument, what was
expected and what was given, so that users see the bad argument, not a shape
error three calls deeper.
"""
from __future__ import annotations

import math
import numbers
import operator
import sys
from typing import Sequence

import numpy as np
import torch


def as_index_tensor(name: str, values, device=None) -> torch.Tensor:
    """Return ``values`` as a 1-D int64 tensor, or raise naming ``name``."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        # torch takes neither negative strides (argsort(...)[::-1]) nor a foreign byte order
        values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("="))
    if isinstance(values, torch.Tensor):
        tensor = values
    else:
        try:  # an empty sequence holds no integers to infer: torch would make it float32
            tensor = torch.as_tensor(values) if len(values) else torch.zeros(0, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a 1-D integer sequence or tensor, got {_sequence_description(values)}"
                            ) from err
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    return tensor.to(device=device, dtype=torch.long)


def _sequence_description(values) -> str:
    """What ``values`` is and holds, for a message: its dtype, else its first element that is not an integer."""
    if isinstance(values, np.ndarray):
        return f"a numpy array of dtype {values.dtype}"
    try:
        odd = next((value for value in values if not isinstance(value, (numbers.Integral, torch.Tensor))), None)
    except TypeError:  # not iterable
        return type(values).__name__
    if odd is None:
        return type(values).__name__
    return f"a {type(values).__name__} holding {type(odd).__name__} {odd!r:.40}"


def check_in_range(name: str, indices: torch.Tensor, upper: int) -> None:
    """Raise unless every entry of ``indices`` lies in ``[0, upper)``."""
    if not indices.numel():
        return
    smallest, largest = torch.stack(torch.aminmax(indices)).tolist()  # one device sync (it runs every step)
    if smallest < 0 or largest >= upper:
        bad = indices[(indices < 0) | (indices >= upper)]
        raise ValueError(f"{name} must lie in [0, {upper}), got {bad[:5].tolist()}")


def check_matrix(name: str, tensor, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """Raise unless ``tensor`` is a finite floating (rows, cols) tensor; return it."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    expected = f"({rows if rows is not None else 'N'}, {cols if cols is not None else 'D'})"
    if tensor.dim() != 2 or (rows is not None and tensor.shape[0] != rows) or (
        cols is not None and tensor.shape[1] != cols
    ):
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")
    check_finite(name, tensor)
    return tensor


class NonFiniteError(ValueError):
    """A tensor holds NaN or inf: :func:`check_finite`'s error, told apart by a caller whose inputs come from a
    model (a diverged training run)."""


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` if ``tensor`` holds NaN or inf."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"{name} must be finite, got {bad} NaN/inf entries")


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an int, raising unless it is an integer in ``[low, high]`` (either bound
    optional): a Python or NumPy integer or a 0-d integer tensor (e.g. ``labels.max() + 1``), not a bool.

    Raises:
        TypeError: not an integer (a bool, a float such as ``2.0``, a string), as ``range(2.0)`` raises.
        ValueError: out of range.
    """
    integer = _integer(value)
    if integer is None:
        raise TypeError(f"{name} must be {integer_phrase(low, high)}, got {value!r}")
    if (low is not None and integer < low) or (high is not None and integer > high):
        raise ValueError(f"{name} must be {integer_phrase(low, high)}, got {value!r}")
    return integer


def check_positive_int(name: str, value) -> int:
    """``check_int(name, value, low=1)``."""
    return check_int(name, value, low=1)


def check_non_negative_int(name: str, value) -> int:
    """``check_int(name, value, low=0)``."""
    return check_int(name, value, low=0)


def integer_phrase(low: int | None, high: int | None) -> str:
    """What :func:`check_int` accepts, in words: ``a positive integer``, ``an integer in [0, 9]``."""
    if high is None and low in (0, 1):
        return "a non-negative integer" if low == 0 else "a positive integer"
    return "an integer" + range_phrase(low, high, strict=False)


def _integer(value) -> int | None:
    """``value`` as an int when it is an integer of any kind but bool; None otherwise."""
    if isinstance(value, (bool, np.bool_)) or getattr(value, "ndim", 0) != 0:  # a one-item tensor indexes too
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_number(name: str, value, *, low: float | None = None, high: float | None = None, strict: bool = False) -> float:
    """Return ``value`` as a float, raising unless it is a finite real number in ``[low, high]``
    (``(low, high]`` with ``strict``; either bound optional).

    Raises:
        TypeError: not a real number (Python, NumPy or a 0-d tensor; a bool is not one).
        ValueError: NaN, infinite or out of range.
    """
    number = _real(value)
    if number is None:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    above_low = low is None or number > low or (not strict and number == low)
    if not (math.isfinite(number) and above_low and (high is None or number <= high)):
        raise ValueError(f"{name} must be a finite number{range_phrase(low, high, strict)}, got {value!r}")
    return number


def _real(value) -> float | None:
    """``value`` as a float when it is a real number of any kind but bool; None otherwise."""
    if isinstance(value, (bool, np.bool_)) or getattr(value, "ndim", 0) != 0:
        return None
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.item()  # 0-d: a Python number, a bool for a bool tensor
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def range_phrase(low, high, strict: bool) -> str:
    """`` in [low, high]``, `` >= low``, `` <= high`` or nothing; ``(`` and ``>`` with ``strict``."""
    if low is not None and high is not None:
        return f" in {'(' if strict else '['}{_bound(low)}, {_bound(high)}]"
    if low is not None:
        return f" {'>' if strict else '>='} {_bound(low)}"
    return "" if high is None else f" <= {_bound(high)}"


def _bound(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)  # :g would print 2**31 - 1 as 2.14748e+09


def check_bool(name: str, value) -> bool:
    """Return ``value`` as a bool, raising unless it is one (``bool("no")`` would be True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name: str, value, choices: Sequence) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_per_channel(name: str, values, positive: bool = False) -> tuple[float, float, float]:
    """``values``, three finite numbers (R, G, B) or one for every channel as ``T.Normalize`` takes, as a
    3-tuple of floats, each at most 1: the statistics of images in [0, 1] (0-255 ones, such as
    ``(123.7, 116.3, 103.5)``, made every output nearly constant, silently); ``positive`` refuses
    values <= 0 (a zero std gives inf and NaN silently)."""
    if isinstance(values, numbers.Real) or getattr(values, "ndim", None) == 0:
        values = [values]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be 1 or 3 numbers (R, G, B), got {type(values).__name__}")
    if len(values) not in (1, 3):
        raise ValueError(f"{name} must be 1 or 3 numbers (R, G, B), got {len(values)}: {values!r}")
    checked = [
        check_number(f"{name}[{i}]", value, low=0.0 if positive else None, strict=positive)
        for i, value in enumerate(values)
    ]
    if max(checked) > 1:
        raise ValueError(f"{name} must hold statistics of images in [0, 1], at most 1, got {values!r}: "
                         "divide 0-255 statistics by 255")
    return tuple(checked * (3 // len(checked)))


def caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, for a warning raised in the caller of this function, of the first
    frame outside torch, PML and this package: the user's line, whether it calls a miner or builds a trainer."""
    internal = ("torch", "pytorch_metric_learning", "pml_protoot")
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in internal:
        level, frame = level + 1, frame.f_back
    return level
