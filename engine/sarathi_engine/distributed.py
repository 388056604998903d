"""Where this process sits in the tensor/pipeline-parallel grid, the process group behind it, and
the collectives the model uses.

Global rank r holds pipeline stage r // tp_size and tensor-parallel rank r % tp_size, so each
stage's ranks are contiguous and rank 0 (the driver) holds the first stage. With both degrees at 1
(the default) every collective is the identity and torch.distributed is never touched.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: object | None = None

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def rank_of(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    @property
    def next_rank(self) -> int:
        """The same tensor-parallel rank one stage on; after the last stage, the first (a ring)."""
        return self.rank_of((self.pp_rank + 1) % self.pp_size, self.tp_rank)

    @property
    def prev_rank(self) -> int:
        return self.rank_of((self.pp_rank - 1) % self.pp_size, self.tp_rank)


_state = ParallelState()


def parallel_state() -> ParallelState:
    return _state


def set_parallel_state(state: ParallelState) -> None:
    global _state
    _state = state


def init_distributed(rank: int, tp_size: int, pp_size: int, master: str, device: torch.device,
                     timeout: float) -> ParallelState:
    """Join the process group of tp_size * pp_size ranks whose rank 0 listens at master
    (host:port), make one tensor-parallel group per stage, and make this rank's place current.
    Blocks until every rank has joined or `timeout` seconds have passed."""
    # Batch descriptions are CPU tensors and always travel over gloo; activations use NCCL on CUDA.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank, world_size=tp_size * pp_size,
                            timeout=timedelta(seconds=timeout))
    groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)]
    pp_rank, tp_rank = divmod(rank, tp_size)
    state = ParallelState(tp_rank, tp_size, pp_rank, pp_size, groups[pp_rank])
    set_parallel_state(state)
    return state


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    set_parallel_state(ParallelState())


def agree_min(value: int) -> int:
    """The smallest of every rank's value (e.g. KV-cache blocks: every rank must use as many)."""
    if _state.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.tp_size > 1:
        dist.all_reduce(x, group=_state.tp_group)
    return x


def tp_gather_last_dim(x: torch.Tensor) -> torch.Tensor | None:
    """Every rank's x side by side along the last dimension, on tensor-parallel rank 0; None elsewhere."""
    if _state.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.tp_size)] if _state.tp_rank == 0 else None
    dist.gather(x.contiguous(), parts, group=_state.tp_group, group_dst=0)
    return None if parts is None else torch.cat(parts, dim=-1)
