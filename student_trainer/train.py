"""The OPD training loop: rollouts with the student, scores from the teacher, a loss, a step.

    prompts -> rollouts (top-p) -> teacher top-K (streamed) -> loss over masked positions -> AdamW

`train(config)` is the whole run; `train_step` and `evaluate_heldout` are the
pieces, usable on their own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from student_trainer.batch import ScoredBatch, collate, mask_fractions, scored_logits, teacher_coverage
from student_trainer.checkpoint import (
    TrainerState,
    capture_rng,
    latest_checkpoint,
    load_trainer_state,
    restore_rng,
    save_checkpoint,
)
from student_trainer.client import TeacherClient, TlsOptions, tokenizer_message
from student_trainer.config import TrainConfig
from student_trainer.data import PromptStream, load_prompts
from student_trainer.losses import sampled_token_loss, support_metrics, topk_reverse_kl
from student_trainer.rollouts import Rollout, generate_rollouts

log = logging.getLogger(__name__)

# Evaluation rollouts use their own fixed seed, so every evaluation of a run
# (and of a resumed run) samples the same way.
EVAL_SEED_OFFSET = 1_000_003

TaskEvaluator = Callable[[torch.nn.Module], dict[str, float]]


class StudentTokens:
    """The token ids of the student tokenizer that the loop needs."""

    def __init__(self, tokenizer) -> None:
        self.eos_ids = [tokenizer.eos_token_id]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.special_ids = list(tokenizer.all_special_ids)


def per_position_loss(config: TrainConfig, logits: torch.Tensor, batch: ScoredBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The configured loss per position [B, P], and the sampled-token advantages [B, P]."""
    mask = batch.mask.to(logits.device)
    if config.loss == "sampled_token":
        return sampled_token_loss(
            logits, batch.targets.to(logits.device), batch.teacher_token_logprobs.to(logits.device), mask, config.gamma
        )
    with torch.no_grad():  # advantages are logged for every loss: they show the baseline's imbalance
        _, advantages = sampled_token_loss(
            logits, batch.targets.to(logits.device), batch.teacher_token_logprobs.to(logits.device), mask
        )
    loss = topk_reverse_kl(
        logits,
        batch.teacher_ids.to(logits.device),
        batch.teacher_logprobs.to(logits.device),
        mask,
        renormalize=config.loss == "topk_rkl",
    )
    return loss, advantages


def sample(model, prompts: list[list[int]], config: TrainConfig, tokens: StudentTokens, seed: int) -> list[Rollout]:
    return generate_rollouts(
        model,
        prompts,
        eos_ids=tokens.eos_ids,
        pad_id=tokens.pad_id,
        top_p=config.top_p,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        seed=seed,
    )


def score_rollouts(teacher: TeacherClient, rollouts: list[Rollout], config: TrainConfig, tokens: StudentTokens):
    scores = teacher.score_many([(r.tokens, r.prompt_length) for r in rollouts], config.top_k)
    return collate(
        rollouts,
        scores,
        pad_id=tokens.pad_id,
        special_ids=tokens.special_ids,
        keep_ids=tokens.eos_ids,
        mask_special_tokens=config.mask_special_tokens,
    )


def train_step(model, optimizer, scheduler, teacher, prompts: list[list[int]], config: TrainConfig, tokens: StudentTokens, step: int) -> dict:
    started = time.perf_counter()
    rollouts = sample(model, prompts, config, tokens, seed=config.seed * 7919 + step)
    generated = time.perf_counter()
    micro_batches = [
        score_rollouts(teacher, rollouts[i : i + config.micro_batch_size], config, tokens)
        for i in range(0, len(rollouts), config.micro_batch_size)
    ]
    scored = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    positions = max(sum(int(b.mask.sum()) for b in micro_batches), 1)
    real_positions = max(sum(int(b.valid.sum()) for b in micro_batches), 1)
    totals: dict[str, float] = defaultdict(float)
    for batch in micro_batches:
        logits = scored_logits(model, batch)
        loss, advantages = per_position_loss(config, logits, batch)
        # Mean over every loss-carrying position of the step, whatever the micro-batching.
        (loss.sum() / positions).backward()
        mask = batch.mask.to(advantages.device)
        used = max(int(mask.sum()), 1)
        position_metrics = support_metrics(logits.detach(), batch.teacher_ids, batch.teacher_logprobs, batch.mask)
        position_metrics.pop("num_positions")
        position_metrics |= {
            "loss": float(loss.detach().sum()) / used,
            "negative_advantage_share": float((advantages < 0)[mask].float().sum()) / used,
            "mean_advantage": float(advantages[mask].sum()) / used,
        }
        for name, value in position_metrics.items():
            totals[name] += value * int(mask.sum()) / positions
        for name, value in mask_fractions(batch).items():
            totals[name] += value * int(batch.valid.sum()) / real_positions
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    finished = time.perf_counter()
    total_tokens = sum(len(r.tokens) for r in rollouts)
    return {
        **totals,
        **teacher_coverage(micro_batches),
        "grad_norm": float(grad_norm),
        "lr": scheduler.get_last_lr()[0],
        "response_length": sum(r.completion_length for r in rollouts) / len(rollouts),
        "scored_positions": positions,
        "tokens_per_s": total_tokens / (finished - started),
        "rollout_s": generated - started,
        "teacher_latency_s": scored - generated,
        "step_s": finished - started,
    }


@torch.no_grad()
def evaluate_heldout(model, teacher, prompts: list[list[int]], config: TrainConfig, tokens: StudentTokens) -> dict:
    """Mean truncated reverse KL to the teacher on the student's own rollouts of held-out prompts."""
    rollouts = sample(model, prompts, config, tokens, seed=config.seed + EVAL_SEED_OFFSET)
    batch = score_rollouts(teacher, rollouts, config, tokens)
    metrics = support_metrics(scored_logits(model, batch), batch.teacher_ids, batch.teacher_logprobs, batch.mask)
    metrics.pop("num_positions")
    return {f"eval_{name}": value for name, value in metrics.items()} | {
        "eval_response_length": sum(r.completion_length for r in rollouts) / len(rollouts)
    }


def teacher_client_options(config: TrainConfig) -> dict:
    """Keyword arguments of TeacherClient from the teacher_* settings (the key is read here, never logged)."""
    if config.teacher_api_key_file:
        api_key = Path(config.teacher_api_key_file).read_text().strip()
    else:
        api_key = os.environ.get("OPD_TEACHER_API_KEY", "").strip()
    tls = None
    if config.teacher_tls or config.teacher_tls_ca or config.teacher_tls_cert:
        tls = TlsOptions(
            root_certificates=config.teacher_tls_ca or None,
            certificate_chain=config.teacher_tls_cert or None,
            private_key=config.teacher_tls_key or None,
            server_name=config.teacher_tls_server_name or None,
        )
    return dict(timeout_s=config.teacher_timeout_s, api_key=api_key or None, tls=tls, pin_teacher=config.pin_teacher)


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


class MetricsLog:
    """OUTPUT/metrics.jsonl, one JSON object per step; a resumed run drops lines past its checkpoint."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


def train(config: TrainConfig, *, resume: bool = False, evaluate_task: TaskEvaluator | None = None) -> list[dict]:
    """Run OPD training as configured; returns the metric records written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    checkpoint = latest_checkpoint(output) if resume else None
    model_path = str(checkpoint / "model") if checkpoint else config.student
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(config.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    prompts = PromptStream(load_prompts(config.prompts, tokenizer), config.seed)
    eval_prompts = load_prompts(config.eval_prompts, tokenizer)[: config.eval_size] if config.eval_prompts else []
    start = 0
    if checkpoint:
        state = load_trainer_state(checkpoint)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        restore_rng(state.rng)
        prompts.position, start = state.data_position, state.step
        log.info("resumed from %s (step %d)", checkpoint, start)
    (output / "config.json").write_text(json.dumps(config.__dict__, indent=2))
    metrics = MetricsLog(output / "metrics.jsonl", resume_step=start)
    tokens = StudentTokens(tokenizer)
    records = []

    def evaluation(step: int) -> dict:
        result = {}
        if eval_prompts:
            result |= evaluate_heldout(model, teacher, eval_prompts, config, tokens)
        if evaluate_task is not None:
            result |= evaluate_task(model)
        return result

    with TeacherClient(config.teacher, **teacher_client_options(config)) as teacher:
        teacher.open_session(tokenizer_message(tokenizer))
        if start == 0 and (eval_prompts or evaluate_task):
            records.append({"step": 0, **evaluation(0)})
            metrics.write(records[-1])
        progress = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="opd", unit="step")
        for step in progress:
            record = {"step": step + 1}
            record |= train_step(model, optimizer, scheduler, teacher, prompts.next_batch(config.batch_size), config, tokens, step)
            last = step + 1 == config.steps
            if last or (config.eval_every and (step + 1) % config.eval_every == 0):
                record |= evaluation(step + 1)
            metrics.write(record)
            records.append(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", rkl=f"{record['topk_rkl']:.4f}")
            if last or (config.save_every and (step + 1) % config.save_every == 0):
                state = TrainerState(
                    step=step + 1,
                    data_position=prompts.position,
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    rng=capture_rng(),
                )
                save_checkpoint(output, model, tokenizer, state, config.keep_checkpoints)
    return records
