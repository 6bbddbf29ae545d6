"""Data parallelism for the trainer: the process group, the model wrapper, reductions.

Run with torchrun (`torchrun --nproc-per-node N -m student_trainer ...`, multi-node with
torchrun's usual rendezvous flags). Each rank takes a contiguous shard of every global
batch, samples its own rollouts, scores them through its own teacher client and
computes the loss on them; gradients are averaged by DDP or by FSDP's reduce-scatter.

Loss scale: a step's loss is the mean over every loss-carrying position of the global
batch. Each rank divides its position sum by the global position count and multiplies
by the world size, which the gradient averaging divides back out, so a data-parallel
step has the gradient of the single-process step over the same global batch.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op on a
world of one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a global batch (the batch size is a multiple of the world size)."""
        per_rank = len(items) // self.size
        return items[self.rank * per_rank : (self.rank + 1) * per_rank]

    def first_index(self, global_size: int) -> int:
        """Index in the global batch of this rank's first item."""
        return self.rank * (global_size // self.size)


def init_world(device: str) -> World:
    """Join the torchrun process group when there is one: gloo on CPU, NCCL on CUDA."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank)


def rank_device(device: str, world: World) -> str:
    """`cuda` means this rank's own GPU; other devices are used as given."""
    return f"cuda:{world.local_rank}" if device == "cuda" else device


def wrap_model(model: torch.nn.Module, parallelism: str, world: World) -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard` on every decoder layer, then the whole model)."""
    if not world.distributed:
        return model
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    # The root is the Hugging Face model even inside a PEFT wrapper: PEFT's generate calls it, not
    # the wrapper, and the root's hooks are what gather the embedding and the head.
    fully_shard(model.get_base_model() if hasattr(model, "get_base_model") else model)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: each becomes one FSDP unit (one all-gather at a time)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard (no _no_split_modules)")
    return layers


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return getattr(model, "module", model)


def all_reduce_sums(values: dict[str, float], world: World) -> dict[str, float]:
    """Sum every value over the ranks (one collective for the whole dict)."""
    if not world.distributed or not values:
        return dict(values)
    names = sorted(values)
    tensor = torch.tensor([float(values[name]) for name in names], dtype=torch.float64)
    dist.all_reduce(tensor)
    return dict(zip(names, tensor.tolist()))


def all_reduce_max(value: float, world: World) -> float:
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def broadcast_object(value, world: World):
    """Rank 0's value on every rank."""
    if not world.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
