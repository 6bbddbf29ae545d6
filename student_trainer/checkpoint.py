"""Atomic checkpoints: a save_pretrained model directory plus the trainer's state.

Layout: OUTPUT/checkpoints/step-000050/{model/, trainer_state.pt}. A checkpoint
is written under a temporary name and renamed into place, so a crash mid-write
leaves the previous checkpoint intact and no half-written one is ever loaded.
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

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    data_position: int  # prompts handed out
    optimizer: dict
    scheduler: dict
    rng: dict


def capture_rng() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


def save_checkpoint(output: Path, model, tokenizer, state: TrainerState, keep: int) -> Path:
    root = output / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        model.save_pretrained(staging / "model")
        tokenizer.save_pretrained(staging / "model")
        torch.save(state.__dict__, staging / "trainer_state.pt")
        if final.exists():  # the same step saved again (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    # weights_only=False: the state holds Python RNG tuples and optimizer dicts we wrote ourselves.
    return TrainerState(**torch.load(checkpoint / "trainer_state.pt", weights_only=False))
