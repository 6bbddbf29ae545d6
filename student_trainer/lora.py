"""LoRA students through PEFT: wrap, reload from a checkpoint, merge, and push merged weights.

A LoRA run trains only the adapter matrices; its checkpoints hold the adapter
(adapter_config.json + adapter_model.safetensors, PEFT's save_pretrained form) and
refer to the base model by path. `opd-merge-lora CHECKPOINT/model OUT` writes the
merged model, a plain Hugging Face model directory.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch


def add_lora(model: torch.nn.Module, r: int, alpha: float, target_modules: list[str], dropout: float = 0.0):
    """`model` with fresh LoRA adapters on `target_modules` (e.g. ["q_proj", "v_proj"] or ["all-linear"])."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = "all-linear" if target_modules == ["all-linear"] else target_modules
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_lora(base: torch.nn.Module, adapter_dir: str, trainable: bool = True):
    """The base model with a saved adapter loaded (trainable, to resume a run)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


@torch.no_grad()
def merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights a merged model would have, under the base model's Hugging Face names.

    Computed as W + scale * B @ A per adapted layer without touching the live model
    (merging in place and back would drift the base weights by rounding every step).
    """
    from peft.tuners.lora import LoraLayer

    for module_name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight.detach().clone()
            for adapter in module.active_adapters:
                weight += module.get_delta_weight(adapter)
            yield f"{module_name}.weight", weight
            bias = module.get_base_layer().bias
            if bias is not None:
                yield f"{module_name}.bias", bias.detach()
    for name, tensor in model.get_base_model().state_dict().items():
        if ".base_layer." not in name and "lora_" not in name:  # adapted layers came above
            yield name, tensor


def merge_lora(adapter_dir: str, output: str) -> None:
    """Write base + adapter as one plain Hugging Face model directory."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32).merge_and_unload()
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="opd-merge-lora", description="Merge a LoRA checkpoint into a plain HF model."
    )
    parser.add_argument(
        "adapter", help="a LoRA checkpoint's model directory, e.g. OUTPUT/checkpoints/step-000100/model"
    )
    parser.add_argument("output", help="directory for the merged model")
    args = parser.parse_args(argv)
    merge_lora(args.adapter, args.output)
    print(f"merged {args.adapter} into {args.output}")


if __name__ == "__main__":
    main()
