"""Shared fixtures: a tiny Llama-shaped teacher built from a config, and a live teacher server.

No downloads: the model is random (fixed seed) and its tokenizer is built with
the `tokenizers` library. head_dim is 32 so the same model also loads in vLLM's
CPU backend.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 96
SPECIAL_TOKEN = "<|think|>"  # a control token: masked as a target, never in the support


def build_tiny_model(
    path: Path,
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    head_rows: int = TINY_VOCAB,
    extra_special_tokens: tuple[str, ...] = (),
) -> Path:
    """head_rows other than TINY_VOCAB pads the lm head; extra_special_tokens get ids past TINY_VOCAB
    (past the head's rows unless it is padded), as in real checkpoints whose tokenizer and head disagree."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", SPECIAL_TOKEN] + [f"w{i}" for i in range(TINY_VOCAB - 4)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=[SPECIAL_TOKEN, *extra_special_tokens],
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=head_rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform predictions; sharper logits make top-K ordering meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-teacher"))


class LiveServer:
    """A TeacherServer running on its own event loop in a background thread."""

    def __init__(self, config) -> None:
        from teacher_server.server import TeacherServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._make(TeacherServer, config))
        self.call(self.server.start())
        self.target = f"127.0.0.1:{self.server.port}"

    @staticmethod
    async def _make(cls, config):
        return cls(config)

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


def server_config(model: Path, **overrides):
    from teacher_server.engines import EngineConfig
    from teacher_server.server import ServerConfig

    engine_config = EngineConfig(model=str(model), chunk_size=overrides.pop("chunk_size", 16))
    return ServerConfig(
        engine_config=engine_config,
        host="127.0.0.1",
        port=overrides.pop("port", 0),
        max_k=overrides.pop("max_k", 32),
        grace_s=1.0,
        **overrides,
    )


@pytest.fixture(scope="session")
def live_server(tiny_model):
    server = LiveServer(server_config(tiny_model))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct in float32 (tests marked `real_model`)."""
    from tests.real_model import missing_reason, smollm2_path

    reason = missing_reason()
    if reason:
        pytest.skip(f"real model unavailable: {reason}")
    return smollm2_path()
