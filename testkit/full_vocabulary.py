"""The reference for head.py: the student's scores from full [B, P, V] logits.

`full_vocabulary_scores` is the trainer's path before head.py (the model's own logits at
every scored position, gathered, logsumexp'd and top-k'd by autograd); the head path must
give the same losses and gradients. `synthetic_batch` and `head_family_model` give the
inputs: a ScoredBatch with padding, masked positions and padded supports, and tiny models
of each output-head family head.py covers.
"""

from __future__ import annotations

import numpy as np
import torch

from student_trainer.batch import ScoredBatch, StudentScores
from student_trainer.messages import TeacherScores
from student_trainer.rollouts import Rollout


def full_vocabulary_scores(model: torch.nn.Module, batch: ScoredBatch) -> StudentScores:
    """StudentScores from the model's full logits [B, P, V] (autograd all the way)."""
    device = next(model.parameters()).device
    first = int(batch.logit_index.min())
    keep = batch.input_ids.shape[1] - first
    output = model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), logits_to_keep=keep
    )
    index = (batch.logit_index - first).to(device)[..., None].expand(-1, -1, output.logits.shape[-1])
    logits = output.logits.gather(1, index).float()
    top_k = batch.teacher_ids.shape[-1]
    ids = torch.cat([batch.teacher_ids, batch.targets[..., None]], dim=-1).to(device)
    picked = logits.gather(-1, ids.clamp(min=0))
    log_norm = torch.logsumexp(logits, dim=-1)
    top_ids = logits.detach().topk(top_k, dim=-1).indices
    return StudentScores(picked[..., :top_k], picked[..., top_k] - log_norm, log_norm, top_ids)


def synthetic_batch(
    vocab: int, *, lengths: list[tuple[int, int]], top_k: int, seed: int = 0, padding_share: float = 0.2
) -> ScoredBatch:
    """Rollouts of random tokens, (prompt, completion) lengths per row, right-padded; a random
    teacher support per position with some padding entries and some masked positions."""
    g = torch.Generator().manual_seed(seed)
    rows, length = len(lengths), max(p + c for p, c in lengths)
    positions = max(c for _, c in lengths)
    input_ids = torch.zeros(rows, length, dtype=torch.long)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    logit_index = torch.zeros(rows, positions, dtype=torch.long)
    valid = torch.zeros(rows, positions, dtype=torch.bool)
    for row, (prompt, completion) in enumerate(lengths):
        input_ids[row, : prompt + completion] = torch.randint(0, vocab, (prompt + completion,), generator=g)
        attention_mask[row, : prompt + completion] = 1
        logit_index[row] = torch.arange(prompt - 1, prompt - 1 + positions).clamp(max=length - 1)
        valid[row, :completion] = True
    targets = input_ids.gather(1, (logit_index + 1).clamp(max=length - 1))
    mask = valid & (torch.rand(rows, positions, generator=g) > 0.15)
    # K distinct ids per position without any [.., V] tensor (benches use V = 152k, P = 16k).
    first = torch.randint(0, vocab, (rows, positions, 1), generator=g)
    teacher_ids = (first + torch.arange(top_k) * (vocab // top_k)) % vocab
    values = (torch.randn(rows, positions, top_k, generator=g) * 2).sort(dim=-1, descending=True).values
    outside = torch.rand(rows, positions, 1, generator=g)  # the teacher's mass outside its top-K, in log space
    teacher_logprobs = values - torch.logsumexp(values, dim=-1, keepdim=True) - outside
    pad = torch.rand(rows, positions, top_k, generator=g) < padding_share
    pad[..., 0] = False
    teacher_ids[pad] = -1
    teacher_logprobs[pad] = float("-inf")
    return ScoredBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        logit_index=logit_index,
        targets=targets,
        valid=valid,
        mask=mask,
        teacher_ids=teacher_ids,
        teacher_logprobs=teacher_logprobs,
        teacher_token_logprobs=-torch.rand(rows, positions, generator=g) * 4,
        reason=torch.zeros(rows, positions, dtype=torch.long),
        behaviour_logprobs=torch.full((rows, positions), float("nan")),
    )


def synthetic_rollouts(
    vocab: int, lengths: list[tuple[int, int]], top_k: int, seed: int = 0
) -> tuple[list[Rollout], list[TeacherScores]]:
    """Rollouts of random tokens with (prompt, completion) lengths, and random teacher answers for
    them (some positions masked), to go through batch.collate in either layout."""
    rng = np.random.default_rng(seed)
    rollouts, scores = [], []
    for prompt, completion in lengths:
        rollouts.append(Rollout(rng.integers(3, vocab, prompt + completion).tolist(), prompt))
        first = rng.integers(0, vocab, (completion, 1))
        ids = ((first + np.arange(top_k) * (vocab // top_k)) % vocab).astype(np.int32)
        logprobs = np.sort(rng.normal(-3, 1, (completion, top_k)), axis=-1)[:, ::-1].astype(np.float32)
        mask = (rng.random(completion) > 0.2).astype(np.uint8)
        token_logprobs = rng.normal(-2, 1, completion).astype(np.float32)
        scores.append(TeacherScores(ids, logprobs, token_logprobs, mask, np.zeros(completion, np.uint8), 1.0, 0.9))
    return rollouts, scores


HEAD_FAMILIES = ("demo", "smollm2", "phi", "gemma2", "granite", "cohere")


def head_family_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A small random float32 model of each head family: untied (the demo student), tied with a
    49,152-token vocabulary (SmolLM2's shape, 2 layers), with a head bias (Phi), soft-capped
    (Gemma 2), scaled down (Granite) and scaled up (Cohere)."""
    import transformers

    from student_trainer.demo import task

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    small |= dict(num_key_value_heads=2, max_position_embeddings=128, vocab_size=300)
    small |= dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    configs = {
        "demo": lambda: task.student_config(len(task.VOCAB)),
        "smollm2": lambda: transformers.LlamaConfig(
            **small
            | dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
            | dict(vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
        ),
        "phi": lambda: transformers.PhiConfig(**small),
        "gemma2": lambda: transformers.Gemma2Config(**small, head_dim=32, final_logit_softcapping=3.0),
        "granite": lambda: transformers.GraniteConfig(**small, logits_scaling=4.0),
        "cohere": lambda: transformers.CohereConfig(**small, logit_scale=2.5),
    }
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(configs[family](), dtype=torch.float32)
    return model.float().eval()


def batch_rows(batch: ScoredBatch, rows: slice) -> ScoredBatch:
    """The rollouts `rows` of a batch (a data-parallel rank's share)."""
    fields = {name: value[rows] if isinstance(value, torch.Tensor) else value for name, value in vars(batch).items()}
    return ScoredBatch(**fields)
