"""One optimizer step over a scored batch, and the held-out evaluation: what the loop does with rollouts.

`optimizer_step` waits for the teacher's scores of one batch (this rank's shard), runs the loss
over its micro-batches and steps; its metrics are means over the global batch.
`evaluate_heldout` scores the student's own rollouts of held-out prompts.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from student_trainer.batch import (
    ScoredBatch,
    behaviour_gaps,
    collate,
    mask_fractions,
    StudentScores,
    student_scores,
    summed_teacher_counts,
    teacher_coverage,
)
from student_trainer.config import TrainConfig
from student_trainer.data import Prompt
from student_trainer.distributed import World, all_reduce_max, all_reduce_sums, unwrap
from student_trainer.environments import Environment, EpisodeOptions, sample_episodes
from student_trainer.losses import entropy_top_count, entropy_top_mask, sampled_token_loss, topk_reverse_kl
from student_trainer.messages import TeacherScores
from student_trainer.rollouts import HfRollouts, Rollout, RolloutEngine, rollout_seeds
from student_trainer.teacher_router import TeacherRouter

# Evaluation rollouts use their own fixed seed, so every evaluation of a run
# (and of a resumed run) samples the same way.
EVAL_SEED_OFFSET = 1_000_003


class StudentTokens:
    """The token ids of the student tokenizer that the loop needs."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer  # multi-turn rollouts decode turns and render observations with it
        self.eos_ids = [tokenizer.eos_token_id]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.special_ids = list(tokenizer.all_special_ids)


def per_position_loss(
    config: TrainConfig, student: StudentScores, batch: ScoredBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """The configured loss per position [B, P], and the sampled-token advantages [B, P]."""
    device = student.token_logprobs.device
    mask = batch.mask.to(device)
    teacher_token_logprobs = batch.teacher_token_logprobs.to(device)
    if config.loss == "sampled_token":
        return sampled_token_loss(student.token_logprobs, teacher_token_logprobs, mask, config.gamma)
    # Advantages are logged for every loss (they show the baseline's imbalance): a_t = log p_T - log q.
    token_logprobs = student.token_logprobs.detach()
    advantages = torch.where(mask.bool(), teacher_token_logprobs.to(token_logprobs.dtype) - token_logprobs, 0.0)
    loss = topk_reverse_kl(
        student.support_logits,
        batch.teacher_ids.to(device),
        batch.teacher_logprobs.to(device),
        mask,
        log_norm=None if config.loss == "topk_rkl" else student.log_norm,
    )
    return loss, advantages


def training_precision(config: TrainConfig, model) -> torch.autocast:
    """The forward's precision: bfloat16 autocast over the float32 weights, or plain float32.

    Autocast, as the HF Trainer's bf16 mode: no second copy of the weights, and the loss,
    the gradient reductions and the optimizer stay float32 (head.py recomputes its blocks in
    the backward pass in the forward's matmul dtype, so they match the forward's).
    """
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16")


def evaluation_seeds(config: TrainConfig, count: int, first: int = 0) -> list[int]:
    return rollout_seeds(config.seed + EVAL_SEED_OFFSET, 0, first, count)


def hf_rollouts(
    model, tokens: StudentTokens, config: TrainConfig | None = None, world: World | None = None
) -> HfRollouts:
    # FSDP: each decoding step gathers parameters collectively, so every rank decodes as long as the longest.
    synced = world is not None and world.distributed and config is not None and config.parallelism == "fsdp"
    return HfRollouts(unwrap(model), eos_ids=tokens.eos_ids, pad_id=tokens.pad_id, synced_processes=synced)


def episode_sums(rollouts: list[Rollout]) -> dict[str, float]:
    rewards = [r.reward for r in rollouts if r.reward is not None]
    return {"turns": sum(r.turns for r in rollouts), "reward_sum": sum(rewards), "rewarded": len(rewards)}


def episode_metrics(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    """turns_mean (student turns per rollout), and reward_mean over the episodes that ended with one."""
    metrics = {f"{prefix}turns_mean": sums["turns"] / max(sums["rollouts"], 1)}
    if sums["rewarded"]:
        metrics[f"{prefix}reward_mean"] = sums["reward_sum"] / sums["rewarded"]
    return metrics


def sample_rollouts(
    engine: RolloutEngine,
    prompts: list[Prompt],
    seeds: list[int],
    config: TrainConfig,
    tokens: StudentTokens,
    environment: Environment | None = None,
    candidates: int = 0,
) -> list[Rollout]:
    """One rollout per prompt: a single completion, or an episode of turns with `environment`."""
    options = dict(top_p=config.top_p, temperature=config.temperature, candidates=candidates)
    if environment is None:
        return engine.generate([p.ids for p in prompts], seeds, max_new_tokens=config.max_new_tokens, **options)
    episode = EpisodeOptions(config.max_turns, config.max_new_tokens, config.rollout_tokens, config.mask_observations)
    return sample_episodes(engine, prompts, seeds, environment, tokens.tokenizer, episode, **options)


def score_rollouts(
    teacher: TeacherRouter, rollouts: list[Rollout], prompts: list[Prompt], config: TrainConfig, tokens: StudentTokens
):
    requests = teacher_requests(rollouts, prompts, config.teacher_chat)
    scores = teacher.score_many(requests, [p.teacher for p in prompts], config.top_k)
    return collate_scores(rollouts, scores, config, tokens)


def teacher_requests(rollouts: list[Rollout], prompts: list[Prompt], chat: bool) -> list[tuple]:
    """(tokens, score_from, the messages the teacher reads as its prompt (Prompt.for_teacher),
    candidate ids or None, score mask or None) per rollout of each prompt."""
    return [
        (r.tokens, r.prompt_length, p.for_teacher(chat), r.candidate_ids, r.score_mask)
        for r, p in zip(rollouts, prompts)
    ]


def collate_scores(rollouts: list[Rollout], scores: list[TeacherScores], config: TrainConfig, tokens: StudentTokens):
    return collate(
        rollouts,
        scores,
        pad_id=tokens.pad_id,
        special_ids=tokens.special_ids,
        keep_ids=tokens.eos_ids,
        mask_special_tokens=config.mask_special_tokens,
        packed=config.packing,
    )


@dataclass
class PendingBatch:
    """One step's rollouts (this rank's shard) and the teacher's answers, possibly still on their way."""

    rollouts: list[Rollout]
    scores: Future  # of list[TeacherScores]
    rollout_s: float
    policy_lag: int
    # The teacher of each rollout, and every teacher of the run: with more than one, the step's
    # record carries the loss and support metrics per teacher too (every rank names the same ones).
    teachers: list[str] = field(default_factory=list)
    teacher_names: tuple[str, ...] = ()


def optimizer_step(
    model, optimizer, scheduler, pending: PendingBatch, config: TrainConfig, tokens: StudentTokens, world: World
) -> dict:
    """Wait for the teacher, take one optimizer step over this rank's shard; metrics of the global batch."""
    started = time.perf_counter()
    scores = pending.scores.result()  # with max_staleness > 0 the teacher may be done already
    teacher_wait = time.perf_counter() - started
    size = config.micro_batch_size
    micro_batches = [
        collate_scores(pending.rollouts[i : i + size], scores[i : i + size], config, tokens)
        for i in range(0, len(pending.rollouts), size)
    ]
    model.train()
    optimizer.zero_grad(set_to_none=True)
    masked = [int(b.mask.sum()) for b in micro_batches]
    local = {
        "positions": sum(masked),
        "trained_positions": sum(entropy_top_count(n, config.entropy_top_ratio) for n in masked),
        "real_positions": sum(int(b.valid.sum()) for b in micro_batches),
    }
    counts = all_reduce_sums(local, world)
    positions, real_positions = max(counts["positions"], 1), max(counts["real_positions"], 1)
    trained_positions = max(counts["trained_positions"], 1)
    totals: dict[str, float] = defaultdict(float)
    gap = {"behaviour_gap_sum": 0.0, "behaviour_gap_count": 0.0}
    gap_max = 0.0
    per_teacher: dict[str, float] = defaultdict(float)
    for start, batch in zip(range(0, len(pending.rollouts), size), micro_batches):
        teachers = pending.teachers[start : start + size] if len(pending.teacher_names) > 1 else []
        position_metrics, trained_sums, gaps, teacher_sums = _backward(
            model, batch, config, world.size, trained_positions, teachers, pending.teacher_names
        )
        for name, value in teacher_sums.items():
            per_teacher[name] += value
        for name, value in position_metrics.items():
            totals[name] += value * int(batch.mask.sum()) / positions
        for name, value in trained_sums.items():
            totals[name] += value / trained_positions
        for name, value in mask_fractions(batch).items():
            totals[name] += value * int(batch.valid.sum()) / real_positions
        gap["behaviour_gap_sum"] += float(gaps.sum())
        gap["behaviour_gap_count"] += gaps.numel()
        gap_max = max(gap_max, float(gaps.max())) if gaps.numel() else gap_max
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    optimizer.step()
    scheduler.step()
    sums = all_reduce_sums(
        dict(totals)
        | {f"counts.{name}": value for name, value in summed_teacher_counts(micro_batches).items()}
        | {"completion_tokens": sum(r.completion_length for r in pending.rollouts), "rollouts": len(pending.rollouts)}
        | {"total_tokens": sum(len(r.tokens) for r in pending.rollouts)}
        | episode_sums(pending.rollouts)
        | gap
        | dict(per_teacher),
        world,
    )
    teacher_counts = {name.removeprefix("counts."): sums.pop(name) for name in list(sums) if name.startswith("counts.")}
    return {
        **{name: sums[name] for name in totals},
        **teacher_means({name: sums[name] for name in per_teacher}),
        **teacher_coverage(teacher_counts),
        "grad_norm": float(grad_norm),
        "lr": scheduler.get_last_lr()[0],
        "response_length": sums["completion_tokens"] / sums["rollouts"],
        **episode_metrics(sums),
        "scored_positions": int(positions),
        "trained_positions": int(trained_positions),
        "policy_lag": pending.policy_lag,
        "behaviour_logprob_gap": sums["behaviour_gap_sum"] / max(sums["behaviour_gap_count"], 1),
        "behaviour_logprob_gap_max": all_reduce_max(gap_max, world),
        "world_size": world.size,
        "total_tokens": sums["total_tokens"],
        "rollout_s": pending.rollout_s,
        "teacher_latency_s": teacher_wait,
    }


def _backward(
    model,
    batch: ScoredBatch,
    config: TrainConfig,
    world_size: int,
    trained_positions: int,
    teachers: list[str] = (),
    teacher_names: tuple[str, ...] = (),
) -> tuple[dict[str, float], dict[str, float], torch.Tensor, dict[str, float]]:
    """Loss and gradients of one micro-batch: its support metrics (means over its loss-carrying
    positions), the sums over the positions it trains on (all of them, or the highest-entropy
    share of them with entropy_top_ratio < 1), the behaviour gaps of its positions, and with
    `teachers` (each rollout's) the sums per teacher (teacher_sums)."""
    select = config.entropy_top_ratio < 1.0
    with training_precision(config, model):
        student = student_scores(model, batch, log_norm_gradient=config.loss != "topk_rkl", entropy=select)
        trained = (
            dataclasses.replace(batch, mask=entropy_top_mask(student.entropy, batch.mask, config.entropy_top_ratio))
            if select
            else batch
        )
        loss, advantages = per_position_loss(config, student, trained)
    gaps = behaviour_gaps(student.token_logprobs.detach(), batch)
    # Mean over every trained position of the global batch, whatever the micro-batching and the
    # world size (gradient averaging over ranks divides the world size back out).
    (loss.sum() * world_size / trained_positions).backward()
    mask = trained.mask.to(advantages.device)
    metrics = student.metrics(batch, batch.mask)
    metrics.pop("num_positions")
    trained_sums = {
        "loss": float(loss.detach().sum()),
        "negative_advantage_share": float((advantages < 0)[mask].float().sum()),
        "mean_advantage": float(advantages[mask].sum()),
    }
    if select:
        entropy = student.entropy.detach()
        metrics["entropy_mean"] = float(entropy[batch.mask.to(entropy.device)].mean()) if batch.mask.any() else 0.0
        trained_sums["entropy_trained_mean"] = float(entropy[mask].sum())
    per_teacher = teacher_sums(student, batch, loss, teachers, teacher_names) if teachers else {}
    return metrics, trained_sums, gaps, per_teacher


def teacher_sums(
    student, batch: ScoredBatch, loss: torch.Tensor, teachers: list[str], names: tuple[str, ...]
) -> dict[str, float]:
    """Per teacher of `names`: its loss-carrying positions among the rollouts it scored
    (`teachers`: each rollout's), and the sums over them of the loss and the support metrics."""
    sums = {}
    for name in names:
        rows = torch.tensor([teacher == name for teacher in teachers], dtype=torch.bool)
        mask = batch.mask & rows[:, None]
        metrics = student.metrics(batch, mask) if mask.any() else {"num_positions": 0}
        count = metrics.pop("num_positions")
        label = f"teacher.{name or 'default'}"
        sums[f"{label}.positions"] = count
        sums[f"{label}.loss"] = float(loss.detach()[rows.to(loss.device)].sum())
        for metric, value in metrics.items():
            sums[f"{label}.{metric}"] = value * count
    return sums


def teacher_means(sums: dict[str, float]) -> dict[str, float]:
    """`teacher.NAME.METRIC` means over each teacher's positions, from teacher_sums over all ranks."""
    means = {}
    for key, value in sums.items():
        label, _, metric = key.rpartition(".")
        if metric != "positions" and sums[f"{label}.positions"]:  # a teacher with no position this step: none
            means[key] = value / sums[f"{label}.positions"]
    return means


@torch.no_grad()
def evaluate_heldout(
    model,
    teacher,
    prompts: list[Prompt],
    config: TrainConfig,
    tokens: StudentTokens,
    world: World,
    environment: Environment | None = None,
) -> dict:
    """Mean truncated reverse KL to the teacher on the student's own rollouts of held-out prompts,
    sampled from the live weights; each rank evaluates its share, the means are over all of them."""
    share = len(prompts) // world.size
    first = world.rank * share
    engine = hf_rollouts(model, tokens, config, world)
    mine = prompts[first : first + share]
    rollouts = sample_rollouts(engine, mine, evaluation_seeds(config, share, first), config, tokens, environment)
    batch = score_rollouts(teacher, rollouts, mine, config, tokens)
    metrics = student_scores(unwrap(model), batch).metrics(batch, batch.mask)
    count = metrics.pop("num_positions")
    sums = all_reduce_sums(
        {name: value * count for name, value in metrics.items()}
        | {
            "positions": count,
            "completion_tokens": sum(r.completion_length for r in rollouts),
            "rollouts": len(rollouts),
        }
        | episode_sums(rollouts),
        world,
    )
    positions = max(sums.pop("positions"), 1)
    return (
        {f"eval_{name}": sums[name] / positions for name in metrics}
        | {"eval_response_length": sums["completion_tokens"] / max(sums["rollouts"], 1)}
        | episode_metrics(sums, prefix="eval_")
    )
