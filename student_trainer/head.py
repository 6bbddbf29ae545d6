"""The student's output head without [B, P, V] logits.

The losses and metrics need, per scored position, the student's logits at a few ids (the
teacher's support, the sampled token) and two reductions over the whole vocabulary (the
log-normaliser and the student's own top-k). The model's forward stops at the final hidden
states (the lm head runs on one position only); everything else comes from those states and
the head's weight here: support logits from the K weight rows of each position, the
vocabulary reductions a block of positions at a time, forward and backward, so memory holds
[block, V], never [B, P, V]. At V = 152k and 16k positions that is the difference between
~10 GB of logits (and as much again for their gradient) and ~32 MB.

Covered heads: a linear layer, tied to the input embeddings or not, with or without bias
(Llama, Qwen2/3, Mistral, SmolLM, Phi-3, GPT-2, ...), optionally scaled (Cohere's
logit_scale, Granite's logits_scaling) and tanh soft-capped (Gemma 2/3's
final_logit_softcapping). `verify_head` compares against the model's own logits once at
start-up and refuses any other head, naming its model type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from student_trainer.distributed import unwrap

# Size of a block of [positions, V] logits: 2**23 float32 values (32 MiB) per buffer, so a
# block holds 2**23 // V positions (55 at V = 152k).
VOCAB_BLOCK_ELEMENTS = 1 << 23
# Positions per block of gathered support rows [block, K, H] in support_logits.
SUPPORT_BLOCK_ROWS = 256


def _autocast_of(tensor: torch.Tensor) -> dict:
    """The autocast state in force for `tensor`'s device, to rebuild the forward's blocks under it."""
    device_type = tensor.device.type
    return dict(
        device_type=device_type,
        dtype=torch.get_autocast_dtype(device_type),
        enabled=torch.is_autocast_enabled(device_type),
    )


class _SupportLogits(torch.autograd.Function):
    """z[n, k] = hidden[n] . weight[ids[n, k]], `block` rows at a time, forward and backward.

    Only hidden, weight and ids are kept for the backward pass; the gathered rows
    [block, K, H] are rebuilt there, so the extra memory is bounded by the block, not by N.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, block: int) -> torch.Tensor:
        out = hidden.new_empty(ids.shape)
        for start in range(0, ids.shape[0], block):
            rows = weight[ids[start : start + block]]  # [c, K, H]
            out[start : start + block] = torch.bmm(rows, hidden[start : start + block, :, None]).squeeze(-1)
        ctx.save_for_backward(hidden, weight, ids)
        ctx.block, ctx.autocast = block, _autocast_of(hidden)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with torch.autocast(**ctx.autocast):
            return _SupportLogits._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: torch.Tensor):
        hidden, weight, ids = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad = grad.to(hidden.dtype)
        for start in range(0, ids.shape[0], ctx.block):
            end = start + ctx.block
            g = grad[start:end]  # [c, K]
            if grad_hidden is not None:
                grad_hidden[start:end] = torch.bmm(g[:, None, :], weight[ids[start:end]]).squeeze(1)
            if grad_weight is not None:
                outer = (g[:, :, None] * hidden[start:end, None, :]).to(grad_weight.dtype)  # [c, K, H]
                grad_weight.index_add_(0, ids[start:end].reshape(-1), outer.reshape(-1, hidden.shape[-1]))
        return grad_hidden, grad_weight, None, None


def support_logits(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    support_ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_rows: int = SUPPORT_BLOCK_ROWS,
) -> torch.Tensor:
    """A linear head's logits at the given ids only: z[..., k] = hidden . W[id_k] (+ b[id_k]).

    hidden [..., H], lm_head_weight [V, H], support_ids [..., K] (pad = -1: gives the logit
    of id 0, which the losses ignore through their padding convention). Returns [..., K]
    in hidden's dtype, differentiable in hidden, weight and bias; equal to
    ``(hidden @ W.T + b).gather(-1, ids)`` without the [..., V] logits.
    """
    shape = support_ids.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    ids = support_ids.reshape(-1, shape[-1]).clamp(min=0).long()
    if flat_hidden.shape[0] != ids.shape[0]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and support_ids {tuple(shape)} disagree on positions")
    logits = _SupportLogits.apply(flat_hidden, lm_head_weight, ids, max(1, block_rows))
    if bias is not None:
        logits = logits + bias[ids]
    return logits.reshape(shape)


@dataclass(frozen=True)
class OutputHead:
    """logits = softcap(scale * (hidden @ weight.T + bias)), computed a few ids or a block at a time."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None  # [V]
    scale: float = 1.0
    softcap: float | None = None  # logits -> softcap * tanh(logits / softcap)

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        """The scaling and soft-capping the model applies after its linear head."""
        z = raw * self.scale if self.scale != 1.0 else raw
        return torch.tanh(z / self.softcap) * self.softcap if self.softcap else z

    def logits_at(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The student's logits [..., K] at ids [..., K] (pad -1 reads id 0), in float32 or wider."""
        raw = support_logits(hidden, self.weight, ids, self.bias)
        return self.transform(raw.to(torch.promote_types(raw.dtype, torch.float32)))

    def vocabulary_stats(
        self, hidden: torch.Tensor, top: int = 0, entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(log-normaliser [...], the student's `top` best ids [..., top], best first, and with
        `entropy` its entropy [...] in nats) over the whole vocabulary (fewer ids when the
        vocabulary is smaller than `top`).

        The log-normaliser is differentiable in hidden, weight and bias; the ids and the entropy are not.
        """
        flat = hidden.reshape(-1, hidden.shape[-1])
        top = min(top, self.weight.shape[0])
        log_norm, top_ids, entropies = _VocabularyStats.apply(flat, self.weight, self.bias, self, top, entropy)
        shape = hidden.shape[:-1]
        return log_norm.reshape(shape), top_ids.reshape(*shape, top), entropies.reshape(shape) if entropy else None

    def block_logits(self, hidden_block: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits [n, V] of a block of hidden states; `weight`: the head's weight already cast
        to the matmul's dtype (the head's own by default)."""
        weight = self.weight if weight is None else weight
        raw = (hidden_block.to(weight.dtype) @ weight.T).float()
        if self.bias is not None:
            raw = raw + self.bias.float()
        return self.transform(raw)

    def block_size(self) -> int:
        return max(1, VOCAB_BLOCK_ELEMENTS // self.weight.shape[0])


def _matmul_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul on `tensor`'s device now (its own without autocast)."""
    device_type = tensor.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else tensor.dtype


class _VocabularyStats(torch.autograd.Function):
    """logsumexp of the head's logits, their top ids and (when asked) the entropy of their
    softmax, one block of positions at a time.

    The block matmuls run in the dtype autocast would use (the weight cast once per pass, not
    once per block), with autocast itself off, so that the backward pass rebuilds exactly the
    forward's block logits: d lse / d z = softmax(z), pulled back through the soft-cap and the
    scale, then through the linear head. Gradients accumulate in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, head: OutputHead, top: int, entropy: bool):
        dtype = _matmul_dtype(weight)
        size = head.block_size()
        log_norm = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        top_ids = torch.empty(hidden.shape[0], top, dtype=torch.long, device=hidden.device)
        entropies = torch.empty(hidden.shape[0] if entropy else 0, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            cast = weight.to(dtype)
            for start in range(0, hidden.shape[0], size):
                z = head.block_logits(hidden[start : start + size], cast)
                block_norm = torch.logsumexp(z, dim=-1)
                log_norm[start : start + size] = block_norm
                if top:
                    top_ids[start : start + size] = z.topk(top, dim=-1).indices
                if entropy:  # H = log Z - E_q[z]
                    expected = (torch.exp(z - block_norm[:, None]) * z).sum(-1)
                    entropies[start : start + size] = block_norm - expected
        ctx.save_for_backward(hidden, weight, bias, log_norm)
        ctx.head, ctx.dtype = head, dtype
        ctx.mark_non_differentiable(top_ids, entropies)
        return log_norm, top_ids, entropies

    @staticmethod
    def backward(ctx, grad_log_norm, _grad_top_ids, _grad_entropies):
        with torch.autocast(grad_log_norm.device.type, enabled=False):
            return _VocabularyStats._backward(ctx, grad_log_norm)

    @staticmethod
    def _backward(ctx, grad_log_norm):
        hidden, weight, bias, log_norm = ctx.saved_tensors
        head: OutputHead = ctx.head
        cast = weight.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        )
        size = head.block_size()
        for start in range(0, hidden.shape[0], size):
            end = start + size
            z = head.block_logits(hidden[start:end], cast)
            grad_z = grad_log_norm[start:end, None] * torch.exp(z - log_norm[start:end, None])
            if head.softcap:
                grad_z = grad_z * (1.0 - (z / head.softcap) ** 2)
            grad_raw = grad_z * head.scale  # float32 [n, V]
            if grad_hidden is not None:
                grad_hidden[start:end] = (grad_raw.to(ctx.dtype) @ cast).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_raw.T, hidden[start:end].float())
            if grad_bias is not None:
                grad_bias += grad_raw.sum(0)
        to_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        to_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, to_weight, to_bias, None, None, None


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside the DDP and PEFT wrappers."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: torch.nn.Module) -> OutputHead:
    """The student's head as it is now (under FSDP: call it after a forward, when the head is gathered)."""
    lm = causal_lm(model)
    linear = lm.get_output_embeddings()
    if type(linear) is not torch.nn.Linear:
        raise ValueError(
            f"the output layer of {type(lm).__name__} is a {type(linear).__name__}, not a plain linear layer "
            "(a LoRA adapter on the lm head?): leave the output layer out of lora_target_modules"
        )
    config = lm.config.get_text_config()
    scale = float(getattr(lm, "logit_scale", 1.0) or 1.0)  # Cohere
    if getattr(config, "logits_scaling", None):  # Granite
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return OutputHead(linear.weight, linear.bias, scale, float(softcap) if softcap else None)


def final_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    logits_to_keep: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states [B, L, H] after the final norm, the model's logits of the last `logits_to_keep`).

    Packed rows: no attention mask and position ids that restart at every sequence (transformers
    then keeps the sequences apart: block-diagonal masks, or varlen kernels with flash attention).

    The states are captured from the decoder during the model's own forward, so DDP and FSDP
    see an ordinary forward (FSDP keeps the root's parameters, the head's included, gathered
    until the backward pass); the lm head itself runs on `logits_to_keep` positions only.
    """
    captured: list[torch.Tensor] = []
    decoder = causal_lm(model).get_decoder()
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            use_cache=False,  # a training forward: no key-value cache (and packed rows need none)
        )
    finally:
        handle.remove()
    return captured[0], output.logits


def _probe_ids(model: torch.nn.Module, length: int) -> torch.Tensor:
    """`length` fixed ids spread over the student's vocabulary, on its device."""
    vocab_size = output_head(model).weight.shape[0]
    return torch.arange(length, device=next(model.parameters()).device) * 7919 % vocab_size


def _model_type(model: torch.nn.Module) -> str:
    lm = causal_lm(model)
    return getattr(lm.config, "model_type", type(lm).__name__)


def _within(worst: float, reference: torch.Tensor, tolerance: float) -> bool:
    return worst <= tolerance * max(1.0, float(reference.abs().max()))


@torch.no_grad()
def verify_head(model: torch.nn.Module, tolerance: float = 1e-3) -> None:
    """Refuse a student whose logits are not what OutputHead computes (an uncovered head).

    Run before FSDP shards the model (the probe reads the whole head).
    """
    probe = _probe_ids(model, 12)[None]
    hidden, logits = final_hidden_states(model, probe, torch.ones_like(probe), logits_to_keep=0)
    worst = float((output_head(model).block_logits(hidden) - logits.float()).abs().max())
    if not _within(worst, logits, tolerance):
        raise ValueError(
            f"the student's output head ({_model_type(model)}) is not one the trainer can compute without "
            f"full-vocabulary logits (its logits differ from a linear head with known scaling and soft-capping by "
            f"{worst:.3g}); covered: linear heads, tied or not, with bias, Cohere logit_scale, Granite "
            "logits_scaling, Gemma final_logit_softcapping"
        )


@torch.no_grad()
def verify_packing(model: torch.nn.Module, tolerance: float = 1e-4) -> None:
    """Refuse packing for a model whose attention does not keep packed sequences apart."""
    probe = _probe_ids(model, 12)
    first, second = probe[:7], probe[7:]
    alone = torch.cat(
        [final_hidden_states(model, ids[None], torch.ones_like(ids[None]))[0][0] for ids in (first, second)]
    )
    positions = torch.cat([torch.arange(7), torch.arange(5)]).to(probe.device)[None]
    packed, _ = final_hidden_states(model, probe[None], None, positions)
    worst = float((packed[0] - alone).abs().max())
    if not _within(worst, alone, tolerance):
        raise ValueError(
            f"{_model_type(model)} does not keep packed sequences apart (hidden states differ by {worst:.3g} from "
            "separate forwards): set packing: false (--no-packing) for this student"
        )
