"""LoRA teachers over one base model: the base weights are loaded once, each adapter adds its own
low-rank weights, and the adapter in force is chosen per batch.

An engine that hosts adapters (engines.ADAPTER_ENGINES) has `load_adapter(name, path, base_name)`
(returns the bytes of the adapter's weights; an adapter that does not fit raises AdapterError)
and `score_adapted(jobs, adapter)` (adapter None: the base alone). The hf engine applies them
with PEFT (`LoraAdapters`, switched per batch); the vLLM engine with its LoRA requests, which
must be enabled when the base loads (`engine_args_for_adapters`). Every teacher hosted on a base
that has adapters, the base's own teacher included, is an `AdapterTeacher`: an engine that scores
with the base and its adapter. The scheduler runs one batch at a time per base (its lane), and
its batches hold the jobs of one teacher, so a switch never happens under a batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from teacher_server.engines.base import ScoringJob, TeacherScores

log = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank choices


class AdapterError(ValueError):
    """An adapter that cannot be applied to its base (the message names both)."""


class LoraAdapters:
    """The LoRA adapters loaded into one HF engine's model (PEFT)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._peft = None  # the PeftModel around engine.model, once an adapter is loaded
        self._active: str | None = None

    def load(self, name: str, path: str, base_name: str) -> int:
        """Load the adapter at `path` as `name`; returns the bytes of its weights."""
        check_adapter_dir(name, path)
        from peft import PeftModel

        before = self._parameter_bytes()
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.engine.model, path, adapter_name=name)
            else:
                self._peft.load_adapter(path, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as error:
            raise AdapterError(
                f"teacher {name!r}: the adapter {path} does not fit its base teacher {base_name!r} "
                f"({self.engine.model_name}): {error}"
            ) from error
        self._peft.eval()
        # A LoRA on the lm head wraps it: the engine must call the wrapper, not the original layer.
        self.engine.lm_head = self.engine.model.get_output_embeddings()
        self._active = "?"  # loading may change the active adapter: the next activate() sets it
        return self._parameter_bytes() - before

    def activate(self, name: str | None) -> None:
        """Make adapter `name` the one in force (None: the base model alone)."""
        if self._peft is None or name == self._active:
            return
        lora = self._peft.base_model
        if name is None:
            lora.disable_adapter_layers()
        else:
            lora.enable_adapter_layers()
            self._peft.set_adapter(name)
        self._active = name

    def _parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.engine.model.parameters())


class AdapterTeacher:
    """An engine that scores with `base` with adapter `adapter` in force (None: the base alone)."""

    def __init__(self, base, adapter: str | None, model_name: str) -> None:
        self.base = base
        self.adapter = adapter
        self.model_name = model_name
        self.name = base.name
        self.vocab_size = base.vocab_size
        self.max_sequence_length = base.max_sequence_length
        self.dtype = base.dtype
        self.temperatures = base.temperatures
        self.supports_branches = base.supports_branches
        self.supports_requested_ids = base.supports_requested_ids

    def score(self, jobs: Sequence[ScoringJob]) -> list[TeacherScores]:
        return self.base.score_adapted(jobs, self.adapter)


def check_adapter_dir(name: str, path: str) -> dict:
    """The adapter's adapter_config.json, or AdapterError saying what `path` lacks."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        raise AdapterError(f"teacher {name!r}: {path} holds no adapter_config.json (a PEFT LoRA adapter directory)")
    return json.loads(config.read_text())


def engine_args_for_adapters(engine_name: str, adapters: list[dict]) -> dict:
    """What the base's engine must be started with to host `adapters` (their adapter_config.json)."""
    if engine_name != "vllm" or not adapters:
        return {}
    rank = max(int(config.get("r", 8)) for config in adapters)
    ranks = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not ranks:
        raise AdapterError(f"LoRA rank {rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")
    return {"enable_lora": True, "max_loras": len(adapters), "max_lora_rank": ranks[0]}
