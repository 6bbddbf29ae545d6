"""Engines score token-id sequences in the teacher's own vocabulary.

Each engine is one small module behind the `Engine` protocol (base.py). Heavy
dependencies are imported only when that engine is chosen.
"""

from __future__ import annotations

from teacher_server.engines.base import Branch, Engine, EngineConfig, ScoringJob, TeacherScores

ENGINE_NAMES = ("hf", "vllm", "sglang")
ADAPTER_ENGINES = ("hf", "vllm")  # the engines that host LoRA teachers over a base (adapters.py)


def load_engine(name: str, config: EngineConfig) -> Engine:
    if name == "hf":
        from teacher_server.engines.hf import HFEngine

        return HFEngine(config)
    if name == "vllm":
        from teacher_server.engines.vllm import VLLMEngine

        return VLLMEngine(config)
    if name == "sglang":
        from teacher_server.engines.sglang import SGLangEngine

        return SGLangEngine(config)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")


__all__ = [
    "ADAPTER_ENGINES",
    "ENGINE_NAMES",
    "Branch",
    "Engine",
    "EngineConfig",
    "ScoringJob",
    "TeacherScores",
    "load_engine",
]
