"""Turn rollouts and the teacher's answers into padded training tensors.

Layout is [B, P] over scored positions: row b, column p is position
prompt_length_b + p of rollout b, predicted by the student logits at the
position before it. Shorter rollouts are padded and their padding is masked.

The model reads the rollouts either right-padded, one per row, or packed: several per
row, positions restarting at each rollout, so that little compute goes to padding
(the attention keeps them apart: head.verify_packing checks the model does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from opd.mask_reasons import MASK_REASONS
from opd.v1 import teacher_pb2
from student_trainer.head import final_hidden_states, output_head
from student_trainer.losses import drop_special_support, special_token_mask, support_metrics, union_support
from student_trainer.messages import TeacherScores
from student_trainer.rollouts import Rollout


@dataclass
class ScoredBatch:
    input_ids: torch.Tensor  # long [R, L], right-padded rollouts (R = B), or packed several to a row (R <= B)
    attention_mask: torch.Tensor  # long [R, L]
    logit_index: torch.Tensor  # long [B, P], column of rollout b's row whose hidden state predicts the target
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
    rows: torch.Tensor | None = None  # long [B], the row of input_ids that holds rollout b (None: row b)
    position_ids: torch.Tensor | None = None  # long [R, L], packed rows: positions restart at every rollout

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    def model_rows(self) -> torch.Tensor:
        """long [B]: the row of input_ids that holds each rollout."""
        return self.rows if self.rows is not None else torch.arange(len(self.logit_index))


def _padded_layout(rollouts: list[Rollout], pad_id: int, positions: int) -> dict:
    length = max(len(r.tokens) for r in rollouts)
    input_ids = torch.full((len(rollouts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rollouts), length), dtype=torch.long)
    logit_index = torch.zeros((len(rollouts), positions), dtype=torch.long)
    for row, rollout in enumerate(rollouts):
        input_ids[row, : len(rollout.tokens)] = torch.tensor(rollout.tokens)
        attention_mask[row, : len(rollout.tokens)] = 1
        start = rollout.prompt_length
        logit_index[row] = torch.arange(start - 1, start - 1 + positions).clamp(max=length - 1)
    return dict(input_ids=input_ids, attention_mask=attention_mask, logit_index=logit_index)


def _packed_layout(rollouts: list[Rollout], pad_id: int, positions: int) -> dict:
    """Rollouts packed first-fit (longest first) into rows as long as the longest rollout.

    Rows that long cost no more attention than padding would (flash attention aside, packed
    rows attend through a block-diagonal mask, quadratic in the row's length), and nearly
    all their tokens are real. A row's unused tail is padding with positions of its own.
    """
    width = max(len(r.tokens) for r in rollouts)
    filled: list[int] = []  # tokens used per row
    placed: dict[int, tuple[int, int]] = {}  # rollout -> (row, offset)
    for index in sorted(range(len(rollouts)), key=lambda i: -len(rollouts[i].tokens)):
        size = len(rollouts[index].tokens)
        row = next((row for row, used in enumerate(filled) if used + size <= width), len(filled))
        if row == len(filled):
            filled.append(0)
        placed[index], filled[row] = (row, filled[row]), filled[row] + size
    input_ids = torch.full((len(filled), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(filled), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)  # real tokens (the model reads position_ids instead)
    for row, used in enumerate(filled):
        position_ids[row, used:] = torch.arange(width - used)
        attention_mask[row, :used] = 1
    logit_index = torch.zeros((len(rollouts), positions), dtype=torch.long)
    for index, rollout in enumerate(rollouts):
        row, offset = placed[index]
        input_ids[row, offset : offset + len(rollout.tokens)] = torch.tensor(rollout.tokens)
        position_ids[row, offset : offset + len(rollout.tokens)] = torch.arange(len(rollout.tokens))
        start = offset + rollout.prompt_length
        logit_index[index] = torch.arange(start - 1, start - 1 + positions).clamp(max=width - 1)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        logit_index=logit_index,
        rows=torch.tensor([placed[index][0] for index in range(len(rollouts))]),
        position_ids=position_ids,
    )


def collate(
    rollouts: list[Rollout],
    scores: list[TeacherScores],
    *,
    pad_id: int,
    special_ids: list[int],
    keep_ids: list[int],
    mask_special_tokens: bool,
    packed: bool = False,
) -> ScoredBatch:
    size = len(rollouts)
    positions = max(r.completion_length for r in rollouts)
    top_k = scores[0].ids.shape[1]
    layout = (_packed_layout if packed else _padded_layout)(rollouts, pad_id, positions)
    valid = torch.zeros((size, positions), dtype=torch.bool)
    teacher_mask = torch.zeros((size, positions), dtype=torch.bool)
    teacher_ids = torch.full((size, positions, top_k), -1, dtype=torch.long)
    teacher_logprobs = torch.full((size, positions, top_k), float("-inf"))
    teacher_token_logprobs = torch.zeros((size, positions))
    reason = torch.zeros((size, positions), dtype=torch.long)
    behaviour_logprobs = torch.full((size, positions), float("nan"))
    for row, (rollout, score) in enumerate(zip(rollouts, scores)):
        count = rollout.completion_length
        valid[row, :count] = True
        teacher_mask[row, :count] = torch.tensor(score.mask.astype(bool))
        teacher_ids[row, :count] = torch.tensor(score.ids.astype(np.int64))
        teacher_logprobs[row, :count] = torch.tensor(score.logprobs)
        teacher_token_logprobs[row, :count] = torch.tensor(score.token_logprobs)
        reason[row, :count] = torch.tensor(score.reason.astype(np.int64))
        if rollout.logprobs is not None:
            behaviour_logprobs[row, :count] = torch.tensor(rollout.logprobs)
    teacher_ids, teacher_logprobs = _with_candidates(rollouts, scores, teacher_ids, teacher_logprobs)
    input_ids, logit_index = layout["input_ids"], layout["logit_index"]
    rows = layout.get("rows", torch.arange(size))
    targets = input_ids[rows].gather(1, (logit_index + 1).clamp(max=input_ids.shape[1] - 1))
    targets = torch.where(valid, targets, pad_id)  # past a rollout's end: padding, whatever the layout
    mask = teacher_mask & valid
    if mask_special_tokens:
        # The trainer applies its own tokenizer's special tokens too, so the masking
        # holds whatever the teacher's session settings are.
        special = special_token_mask(targets, special_ids, keep_ids) & valid
        reason = torch.where(special & mask, teacher_pb2.MASK_REASON_SPECIAL, reason)
        mask &= ~special
        teacher_ids, teacher_logprobs = drop_special_support(teacher_ids, teacher_logprobs, special_ids, keep_ids)
    return ScoredBatch(
        **layout,
        teacher_counts=_summed_counts(scores),
        targets=targets,
        valid=valid,
        mask=mask,
        teacher_ids=teacher_ids,
        teacher_logprobs=teacher_logprobs,
        teacher_token_logprobs=teacher_token_logprobs,
        reason=reason,
        behaviour_logprobs=behaviour_logprobs,
    )


def _with_candidates(
    rollouts: list[Rollout], scores: list[TeacherScores], teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The support joined with the student's candidates the teacher scored (losses.union_support):
    [B, P, K + M]; as it was when the rollouts carry none."""
    if all(score.candidate_logprobs is None for score in scores):
        return teacher_ids, teacher_logprobs
    width = max(score.candidate_logprobs.shape[1] for score in scores if score.candidate_logprobs is not None)
    candidate_ids = torch.full((*teacher_ids.shape[:2], width), -1, dtype=torch.long)
    candidate_logprobs = torch.full(candidate_ids.shape, float("-inf"))
    for row, (rollout, score) in enumerate(zip(rollouts, scores)):
        if score.candidate_logprobs is not None:
            count, m = score.candidate_logprobs.shape
            candidate_ids[row, :count, :m] = torch.tensor(rollout.candidate_ids.astype(np.int64))
            candidate_logprobs[row, :count, :m] = torch.tensor(score.candidate_logprobs)
    return union_support(teacher_ids, teacher_logprobs, candidate_ids, candidate_logprobs)


def _summed_counts(scores: list[TeacherScores]) -> dict[str, float]:
    """The teacher's coverage counts (ScoreResponse.counts) summed over the rollouts that carry them."""
    counts: dict[str, float] = {}
    for score in scores:
        if getattr(score, "counts", None) is not None:
            for name, value in ((f.name, getattr(score.counts, f.name)) for f in score.counts.DESCRIPTOR.fields):
                counts[name] = counts.get(name, 0.0) + float(value)
    return counts


@dataclass
class StudentScores:
    """The student's numbers at the scored positions of a batch, computed without [B, P, V] logits."""

    support_logits: torch.Tensor  # [B, P, K], logits at the teacher's support ids (pad entries: id 0's)
    token_logprobs: torch.Tensor  # [B, P], log q of the targets
    log_norm: torch.Tensor  # [B, P], logsumexp of the logits over the whole vocabulary
    top_ids: torch.Tensor  # long [B, P, K], the student's own best ids, best first (no gradient)
    entropy: torch.Tensor | None = None  # [B, P], the student's entropy in nats (no gradient), when asked

    def metrics(self, batch: ScoredBatch, mask: torch.Tensor) -> dict[str, float]:
        """losses.support_metrics over the positions of `mask`."""
        return support_metrics(
            self.support_logits.detach(),
            batch.teacher_ids.to(self.top_ids.device),
            batch.teacher_logprobs.to(self.top_ids.device),
            mask.to(self.top_ids.device),
            self.log_norm.detach(),
            self.top_ids,
        )


def student_scores(model, batch: ScoredBatch, log_norm_gradient: bool = False, entropy: bool = False) -> StudentScores:
    """The student's logits at the teacher's support and at its targets, and its vocabulary statistics.

    From the final hidden states and the output head (head.py), at the real positions only
    (padding costs no head work): the support and target logits carry gradients; the
    log-normaliser does when `log_norm_gradient` (the losses that need the student's full
    distribution: the unnormalised ablation and the sampled-token baseline); the entropy, in the
    same pass over the vocabulary, when `entropy`.
    """
    device = next(model.parameters()).device
    hidden, _ = final_hidden_states(
        model,
        batch.input_ids.to(device),
        None if batch.packed else batch.attention_mask.to(device),
        None if not batch.packed else batch.position_ids.to(device),
    )
    rollout, column = batch.valid.nonzero(as_tuple=True)  # the real positions, N of them
    source = batch.model_rows()[rollout] * hidden.shape[1] + batch.logit_index[rollout, column]
    hidden = hidden.reshape(-1, hidden.shape[-1])[source.to(device)]  # [N, H]
    head = output_head(model)
    top_k = batch.teacher_ids.shape[-1]
    ids = torch.cat([batch.teacher_ids, batch.targets[..., None]], dim=-1)[rollout, column].to(device)
    logits = head.logits_at(hidden, ids)
    with torch.set_grad_enabled(log_norm_gradient and torch.is_grad_enabled()):
        log_norm, top_ids, entropies = head.vocabulary_stats(
            hidden if log_norm_gradient else hidden.detach(), top_k, entropy
        )

    def spread(values: torch.Tensor) -> torch.Tensor:
        """[N, ...] values at their [B, P] places, zeros at padding (differentiable)."""
        out = values.new_zeros(*batch.valid.shape, *values.shape[1:])
        return out.index_put((rollout.to(device), column.to(device)), values)

    return StudentScores(
        spread(logits[:, :top_k]),
        spread(logits[:, top_k] - log_norm),
        spread(log_norm),
        spread(top_ids),
        spread(entropies) if entropy else None,
    )


@torch.no_grad()
def behaviour_gaps(token_logprobs: torch.Tensor, batch: ScoredBatch) -> torch.Tensor:
    """|log-prob the rollout engine recorded - the trained model's log-prob| of each target that has one.

    `token_logprobs` [B, P]: the trained model's log q of the targets (StudentScores.token_logprobs).
    About 0 when the engine sampled with the weights being trained (float rounding only; with
    dtype bfloat16, bfloat16 rounding, as rollouts sample in float32); a weight push that
    failed, or policy lag, shows up here.
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
