"""torch.distributed helpers: identical memory banks and evaluation sets on every rank.

Outside ``torch.distributed`` with more than one process every helper gives what one process
holds (its input; ``all_gather_objects(obj)`` gives ``[obj]``; ``gather_strided`` still checks its
lengths), so library code calls them unconditionally. They are
collectives: in a distributed run every rank must call them in the same order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed", "get_rank", "get_world_size",
    "all_gather_rows", "all_gather_objects", "broadcast_", "gather_strided",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank; 0 without ``torch.distributed``."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes; 1 without ``torch.distributed``."""
    return dist.get_world_size() if is_distributed() else 1


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order.

    Ranks may hold different numbers of rows (even zero): rows are padded to the
    largest count for ``all_gather`` and the padding is dropped afterwards.

    Args:
        tensor: ``(n_r, ...)`` on this rank; trailing shape and dtype equal on all ranks.

    Returns:
        ``(sum_r n_r, ...)``: rank 0's rows, then rank 1's, ...; ``tensor`` itself when
        not distributed.

    Example:
        >>> import torch
        >>> from pml_protoot.distributed import all_gather_rows
        >>> all_gather_rows(torch.arange(3))  # one process: unchanged
        tensor([0, 1, 2])
    """
    if not is_distributed():
        return tensor
    counts = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(tensor)], device=tensor.device))
    counts = [int(count) for count in counts]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([rows[:count] for rows, count in zip(gathered, counts)])


def all_gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` on one process).

    Tensors inside ``obj`` keep their device; with NCCL, set each rank's CUDA device first
    (``torch.cuda.set_device``), as ``torch.distributed.all_gather_object`` requires.
    """
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_strided(shard: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble items ``0..total-1`` from strided shards: rank ``r`` holds items ``r, r+W, r+2W, ...``.

    Args:
        shard: ``(len(range(rank, total, W)), ...)`` this rank's items in order.
        total: number of items over all ranks.

    Returns:
        ``(total, ...)`` in item order; ``shard`` itself when not distributed.

    Raises:
        ValueError: ``shard`` does not hold this rank's share of ``total`` items.
    """
    world_size, rank = get_world_size(), get_rank()
    expected = len(range(rank, total, world_size))
    if len(shard) != expected:
        raise ValueError(f"shard must hold {expected} rows (rank {rank} of {world_size}, total {total}), got {len(shard)}")
    if world_size == 1:
        return shard
    gathered = all_gather_rows(shard)
    order = torch.cat([torch.arange(r, total, world_size) for r in range(world_size)])
    result = torch.empty_like(gathered)
    result[order.to(gathered.device)] = gathered
    return result


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s values and return it (no-op on one process)."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor
