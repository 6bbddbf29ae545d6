"""Atomic checkpoints: a save_pretrained model directory plus the trainer's state.

Layout: OUTPUT/checkpoints/step-000050/
    model/              full weights in save_pretrained form (a LoRA run: the adapter), written by rank 0
    optimizer/          optimizer state, torch.distributed.checkpoint: one shard file per rank
    trainer_state.pt    step, data position, LR schedule, RNG, world size, teacher pin (rank 0)

A checkpoint is written under a temporary name and renamed into place by rank 0
after every rank has written its part, so a crash mid-write leaves the previous
checkpoint intact and no half-written one is ever loaded. The model directory
loads with any world size (or as a plain Hugging Face model); the optimizer shards
are resharded by torch.distributed.checkpoint on load.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from student_trainer.distributed import World, barrier, broadcast_object, unwrap

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    data_position: int  # prompts handed out
    scheduler: dict
    rng: dict
    world_size: int = 1
    # "model@weights_sha256" of the teacher a --pin-teacher run was pinned to: a resumed run
    # keeps that pin, so it refuses a teacher that was swapped while it was stopped.
    teacher_pin: str | None = None
    teacher_pins: dict[str, str] | None = None  # ... of each teacher by name, a run with several ("" the default)


def capture_rng() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


def save_checkpoint(output: Path, model, optimizer, tokenizer, state: TrainerState, keep: int, world: World) -> Path:
    """Write step `state.step` atomically; every rank calls this (the state dicts are collectives)."""
    root = output / "checkpoints"
    final = root / f"step-{state.step:06d}"
    staging = None
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    staging = broadcast_object(staging, world)
    try:
        model = unwrap(model)
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        dcp.save(
            {"optimizer": get_optimizer_state_dict(model, optimizer)},
            checkpoint_id=staging / "optimizer",
            no_dist=not world.distributed,
        )
        if world.is_main:
            model.save_pretrained(staging / "model", state_dict=weights)
            tokenizer.save_pretrained(staging / "model")
            torch.save(state.__dict__, staging / "trainer_state.pt")
        barrier(world)
        if world.is_main:
            if final.exists():  # the same step saved again (a resumed run): replace it
                shutil.rmtree(final)
            os.replace(staging, final)
            for old in list_checkpoints(output)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if world.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier(world)
    return final


def load_optimizer_state(checkpoint: Path, model, optimizer, world: World) -> None:
    """Fill `optimizer` (already built over `model`'s parameters) from the checkpoint's shards."""
    model = unwrap(model)
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=checkpoint / "optimizer", no_dist=not world.distributed)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if _STEP_DIR.match(path.name) and (path / "trainer_state.pt").exists()]
    return sorted(found, key=lambda path: int(_STEP_DIR.match(path.name).group(1)))


def latest_checkpoint(output: Path) -> Path | None:
    checkpoints = list_checkpoints(output)
    return checkpoints[-1] if checkpoints else None


def load_trainer_state(checkpoint: Path) -> TrainerState:
    # weights_only=False: the state holds Python RNG tuples and scheduler dicts we wrote ourselves.
    return TrainerState(**torch.load(checkpoint / "trainer_state.pt", weights_only=False))
