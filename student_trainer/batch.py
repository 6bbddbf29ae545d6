"""Turn rollouts and the teacher's answers into padded training tensors.

Layout is [B, P] over scored positions: row b, column p is position
prompt_length_b + p of rollout b, predicted by the student logits at the
position before it. Shorter rollouts are padded and their padding is masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from opd.mask_reasons import MASK_REASONS
from opd.v1 import teacher_pb2
from student_trainer.losses import drop_special_support, special_token_mask
from student_trainer.messages import TeacherScores
from student_trainer.rollouts import Rollout


@dataclass
class ScoredBatch:
    input_ids: torch.Tensor  # long [B, L], right-padded rollouts
    attention_mask: torch.Tensor  # long [B, L]
    logit_index: torch.Tensor  # long [B, P], position whose logits predict the target
    targets: torch.Tensor  # long [B, P], the student's sampled tokens
    valid: torch.Tensor  # bool [B, P], a real position (not padding)
    mask: torch.Tensor  # bool [B, P], a position that carries loss
    teacher_ids: torch.Tensor  # long [B, P, K], pad -1
    teacher_logprobs: torch.Tensor  # float [B, P, K], pad -inf
    teacher_token_logprobs: torch.Tensor  # float [B, P]
    reason: torch.Tensor  # long [B, P], teacher MaskReason (special targets found here too)
    # The rollout engine's log-prob of each target when it sampled it (NaN: not recorded).
    behaviour_logprobs: torch.Tensor | None = None  # float [B, P]
    # The teacher's own coverage counts summed over the batch (ScoreResponse.counts):
    # positions, with_distribution, retained_mass_sum, branch_sequences, ...
    teacher_counts: dict[str, float] = field(default_factory=dict)


def collate(
    rollouts: list[Rollout],
    scores: list[TeacherScores],
    *,
    pad_id: int,
    special_ids: list[int],
    keep_ids: list[int],
    mask_special_tokens: bool,
) -> ScoredBatch:
    size = len(rollouts)
    length = max(len(r.tokens) for r in rollouts)
    positions = max(r.completion_length for r in rollouts)
    top_k = scores[0].ids.shape[1]
    input_ids = torch.full((size, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((size, length), dtype=torch.long)
    logit_index = torch.zeros((size, positions), dtype=torch.long)
    valid = torch.zeros((size, positions), dtype=torch.bool)
    teacher_mask = torch.zeros((size, positions), dtype=torch.bool)
    teacher_ids = torch.full((size, positions, top_k), -1, dtype=torch.long)
    teacher_logprobs = torch.full((size, positions, top_k), float("-inf"))
    teacher_token_logprobs = torch.zeros((size, positions))
    reason = torch.zeros((size, positions), dtype=torch.long)
    behaviour_logprobs = torch.full((size, positions), float("nan"))
    for row, (rollout, score) in enumerate(zip(rollouts, scores)):
        count, start = rollout.completion_length, rollout.prompt_length
        input_ids[row, : len(rollout.tokens)] = torch.tensor(rollout.tokens)
        attention_mask[row, : len(rollout.tokens)] = 1
        logit_index[row] = torch.arange(start - 1, start - 1 + positions).clamp(max=length - 1)
        valid[row, :count] = True
        teacher_mask[row, :count] = torch.tensor(score.mask.astype(bool))
        teacher_ids[row, :count] = torch.tensor(score.ids.astype(np.int64))
        teacher_logprobs[row, :count] = torch.tensor(score.logprobs)
        teacher_token_logprobs[row, :count] = torch.tensor(score.token_logprobs)
        reason[row, :count] = torch.tensor(score.reason.astype(np.int64))
        if rollout.logprobs is not None:
            behaviour_logprobs[row, :count] = torch.tensor(rollout.logprobs)
    targets = input_ids.gather(1, (logit_index + 1).clamp(max=length - 1))
    mask = teacher_mask & valid
    if mask_special_tokens:
        # The trainer applies its own tokenizer's special tokens too, so the masking
        # holds whatever the teacher's session settings are.
        special = special_token_mask(targets, special_ids, keep_ids) & valid
        reason = torch.where(special & mask, teacher_pb2.MASK_REASON_SPECIAL, reason)
        mask &= ~special
        teacher_ids, teacher_logprobs = drop_special_support(teacher_ids, teacher_logprobs, special_ids, keep_ids)
    return ScoredBatch(
        teacher_counts=_summed_counts(scores),
        input_ids=input_ids,
        attention_mask=attention_mask,
        logit_index=logit_index,
        targets=targets,
        valid=valid,
        mask=mask,
        teacher_ids=teacher_ids,
        teacher_logprobs=teacher_logprobs,
        teacher_token_logprobs=teacher_token_logprobs,
        reason=reason,
        behaviour_logprobs=behaviour_logprobs,
    )


def _summed_counts(scores: list[TeacherScores]) -> dict[str, float]:
    """The teacher's coverage counts (ScoreResponse.counts) summed over the rollouts that carry them."""
    counts: dict[str, float] = {}
    for score in scores:
        if getattr(score, "counts", None) is not None:
            for name, value in ((f.name, getattr(score.counts, f.name)) for f in score.counts.DESCRIPTOR.fields):
                counts[name] = counts.get(name, 0.0) + float(value)
    return counts


def scored_logits(model, batch: ScoredBatch) -> torch.Tensor:
    """Student logits [B, P, V] at the scored positions.

    The lm head runs only from the first scored position on (`logits_to_keep`): prompt
    positions before it need hidden states but never a vocabulary-sized row.
    """
    device = next(model.parameters()).device
    first = int(batch.logit_index.min())
    keep = batch.input_ids.shape[1] - first
    output = model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), logits_to_keep=keep
    )
    index = (batch.logit_index - first).to(device)[..., None].expand(-1, -1, output.logits.shape[-1])
    return output.logits.gather(1, index).float()


@torch.no_grad()
def behaviour_gaps(token_logprobs: torch.Tensor, batch: ScoredBatch) -> torch.Tensor:
    """|log-prob the rollout engine recorded - the trained model's log-prob| of each target that has one.

    `token_logprobs` [B, P]: the trained model's log q of the targets (losses.student_token_logprobs).
    About 0 when the engine sampled with the weights being trained (float rounding only); a
    weight push that failed, or policy lag, shows up here.
    """
    recorded = batch.behaviour_logprobs.to(token_logprobs.device)
    seen = batch.valid.to(token_logprobs.device) & ~recorded.isnan()
    return (recorded[seen] - token_logprobs[seen]).abs()


def summed_teacher_counts(batches: list[ScoredBatch]) -> dict[str, float]:
    total: dict[str, float] = {}
    for batch in batches:
        for name, value in batch.teacher_counts.items():
            total[name] = total.get(name, 0.0) + value
    return total


def teacher_coverage(total: dict[str, float]) -> dict[str, float]:
    """The teacher's coverage from its summed counts: share of positions with a distribution,
    mean retained teacher mass on the support, extra branch sequences (cross-tokenizer)."""
    if not total.get("positions"):
        return {}
    return {
        "teacher_coverage": total.get("with_distribution", 0.0) / total["positions"],
        "teacher_retained_mass": total.get("retained_mass_sum", 0.0) / max(total.get("with_distribution", 0.0), 1.0),
        "teacher_branch_sequences": total.get("branch_sequences", 0.0),
    }


def mask_fractions(batch: ScoredBatch) -> dict[str, float]:
    """Share of real positions masked, per reason."""
    real = max(int(batch.valid.sum()), 1)
    masked = batch.valid & ~batch.mask
    return {
        f"masked_{name}": float((masked & (batch.reason == code)).sum()) / real for name, code in MASK_REASONS.items()
    } | {"masked": float(masked.sum()) / real}
