"""A tiny Llama-shaped teacher built from a config, for tests and benches: no downloads.

The model is random (fixed seed) and its tokenizer is built with the `tokenizers`
library. head_dim is 32 so the same model also loads in vLLM's CPU backend.
"""

from __future__ import annotations

from pathlib import Path

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
    word: str = "w",
) -> Path:
    """head_rows other than TINY_VOCAB pads the lm head; extra_special_tokens get ids past TINY_VOCAB
    (past the head's rows unless it is padded), as in real checkpoints whose tokenizer and head disagree.
    `word`: the prefix of the vocabulary's words (another prefix: another tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", SPECIAL_TOKEN] + [f"{word}{i}" for i in range(TINY_VOCAB - 4)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=[SPECIAL_TOKEN, *extra_special_tokens],
        # Each message's words, then the turn's end: enough for the messages paths of the service
        # and the trainer (the contents must be words of the vocabulary).
        chat_template="{% for m in messages %}{{ m['content'] }} <eos> {% endfor %}",
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


def build_tiny_adapter(base: Path, path: Path, *, seed: int, merged: Path | None = None) -> Path:
    """A random LoRA adapter (PEFT, rank 4 on the attention and MLP projections) over `base`;
    `merged`: also the base with the adapter merged into its weights, saved as a plain model (the
    reference a LoRA teacher must equal)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapted = get_peft_model(model, config)
    adapted.save_pretrained(path)
    if merged is not None:
        adapted.merge_and_unload().save_pretrained(merged)
        AutoTokenizer.from_pretrained(base).save_pretrained(merged)
    return path
