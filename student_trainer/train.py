"""The OPD training loop: rollouts with the student, scores from the teacher, a loss, a step.

    prompts -> rollouts (top-p) -> teacher top-K (streamed) -> loss over masked positions -> AdamW

`train(config)` is the whole run, in one process or one rank of a torchrun job
(distributed.py); `optimizer_step` and `evaluate_heldout` are the pieces.

Policy lag: the number of optimizer steps between the weights that sampled a batch
and the weights it trains. 0 with the hf rollout engine; with vLLM rollouts it is the
steps since the last weight push (rollout_sync_every - 1 at most); overlap_scoring
adds one (batch i+1 is sampled while batch i is scored, before step i is taken).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from student_trainer.batch import (
    ScoredBatch,
    behaviour_gaps,
    collate,
    mask_fractions,
    scored_logits,
    summed_teacher_counts,
    teacher_coverage,
)
from student_trainer.channels import TlsOptions
from student_trainer.checkpoint import (
    TrainerState,
    capture_rng,
    latest_checkpoint,
    load_optimizer_state,
    load_trainer_state,
    restore_rng,
    save_checkpoint,
)
from student_trainer.client import TeacherClient
from student_trainer.config import TrainConfig
from student_trainer.data import PromptStream, load_prompts
from student_trainer.distributed import (
    World,
    all_reduce_max,
    all_reduce_sums,
    init_world,
    rank_device,
    shutdown,
    unwrap,
    wrap_model,
)
from student_trainer.lora import add_lora, is_lora, load_lora, merged_weights
from student_trainer.losses import (
    log_normalizer,
    sampled_token_loss,
    student_token_logprobs,
    support_metrics,
    topk_reverse_kl,
)
from student_trainer.messages import TeacherScores, tokenizer_message
from student_trainer.rollouts import HfRollouts, Rollout, RolloutEngine, rollout_seeds

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


def per_position_loss(
    config: TrainConfig, logits: torch.Tensor, batch: ScoredBatch, token_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The configured loss per position [B, P], and the sampled-token advantages [B, P].

    `token_logprobs`: the student's log q of the targets (no gradient), shared with the metrics.
    """
    mask = batch.mask.to(logits.device)
    teacher_token_logprobs = batch.teacher_token_logprobs.to(logits.device)
    if config.loss == "sampled_token":
        return sampled_token_loss(logits, batch.targets.to(logits.device), teacher_token_logprobs, mask, config.gamma)
    # Advantages are logged for every loss (they show the baseline's imbalance): a_t = log p_T - log q.
    advantages = torch.where(mask.bool(), teacher_token_logprobs.to(token_logprobs.dtype) - token_logprobs, 0.0)
    loss = topk_reverse_kl(
        logits,
        batch.teacher_ids.to(logits.device),
        batch.teacher_logprobs.to(logits.device),
        mask,
        renormalize=config.loss == "topk_rkl",
    )
    return loss, advantages


def evaluation_seeds(config: TrainConfig, count: int, first: int = 0) -> list[int]:
    return rollout_seeds(config.seed + EVAL_SEED_OFFSET, 0, first, count)


def hf_rollouts(model, tokens: StudentTokens, synced_processes: bool = False) -> HfRollouts:
    return HfRollouts(unwrap(model), eos_ids=tokens.eos_ids, pad_id=tokens.pad_id, synced_processes=synced_processes)


def score_rollouts(teacher: TeacherClient, rollouts: list[Rollout], config: TrainConfig, tokens: StudentTokens):
    return collate_scores(rollouts, teacher.score_many(teacher_requests(rollouts), config.top_k), config, tokens)


def teacher_requests(rollouts: list[Rollout]) -> list[tuple[list[int], int]]:
    return [(r.tokens, r.prompt_length) for r in rollouts]


def collate_scores(rollouts: list[Rollout], scores: list[TeacherScores], config: TrainConfig, tokens: StudentTokens):
    return collate(
        rollouts,
        scores,
        pad_id=tokens.pad_id,
        special_ids=tokens.special_ids,
        keep_ids=tokens.eos_ids,
        mask_special_tokens=config.mask_special_tokens,
    )


@dataclass
class PendingBatch:
    """One step's rollouts (this rank's shard) and the teacher's answers, possibly still on their way."""

    rollouts: list[Rollout]
    scores: Future  # of list[TeacherScores]
    rollout_s: float
    policy_lag: int


def optimizer_step(
    model, optimizer, scheduler, pending: PendingBatch, config: TrainConfig, tokens: StudentTokens, world: World
) -> dict:
    """Wait for the teacher, take one optimizer step over this rank's shard; metrics of the global batch."""
    started = time.perf_counter()
    scores = pending.scores.result()  # with overlap_scoring the teacher may be done already
    teacher_wait = time.perf_counter() - started
    size = config.micro_batch_size
    micro_batches = [
        collate_scores(pending.rollouts[i : i + size], scores[i : i + size], config, tokens)
        for i in range(0, len(pending.rollouts), size)
    ]
    model.train()
    optimizer.zero_grad(set_to_none=True)
    local = {
        "positions": sum(int(b.mask.sum()) for b in micro_batches),
        "real_positions": sum(int(b.valid.sum()) for b in micro_batches),
    }
    counts = all_reduce_sums(local, world)
    positions, real_positions = max(counts["positions"], 1), max(counts["real_positions"], 1)
    totals: dict[str, float] = defaultdict(float)
    gap = {"behaviour_gap_sum": 0.0, "behaviour_gap_count": 0.0}
    gap_max = 0.0
    for batch in micro_batches:
        logits = scored_logits(model, batch)
        # The one full-vocabulary reduction of the step outside the loss; the metrics share it.
        log_norm = log_normalizer(logits)
        token_logprobs = student_token_logprobs(logits, batch.targets.to(logits.device), log_norm)
        loss, advantages = per_position_loss(config, logits, batch, token_logprobs)
        gaps = behaviour_gaps(token_logprobs, batch)
        gap["behaviour_gap_sum"] += float(gaps.sum())
        gap["behaviour_gap_count"] += gaps.numel()
        gap_max = max(gap_max, float(gaps.max())) if gaps.numel() else gap_max
        # Mean over every loss-carrying position of the global batch, whatever the micro-batching and
        # the world size (gradient averaging over ranks divides the world size back out).
        (loss.sum() * world.size / positions).backward()
        mask = batch.mask.to(advantages.device)
        used = max(int(mask.sum()), 1)
        position_metrics = support_metrics(
            logits.detach(), batch.teacher_ids, batch.teacher_logprobs, batch.mask, log_norm
        )
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
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    optimizer.step()
    scheduler.step()
    sums = all_reduce_sums(
        dict(totals)
        | {f"counts.{name}": value for name, value in summed_teacher_counts(micro_batches).items()}
        | {"completion_tokens": sum(r.completion_length for r in pending.rollouts), "rollouts": len(pending.rollouts)}
        | {"total_tokens": sum(len(r.tokens) for r in pending.rollouts)}
        | gap,
        world,
    )
    teacher_counts = {name.removeprefix("counts."): sums.pop(name) for name in list(sums) if name.startswith("counts.")}
    return {
        **{name: sums[name] for name in totals},
        **teacher_coverage(teacher_counts),
        "grad_norm": float(grad_norm),
        "lr": scheduler.get_last_lr()[0],
        "response_length": sums["completion_tokens"] / sums["rollouts"],
        "scored_positions": int(positions),
        "policy_lag": pending.policy_lag,
        "behaviour_logprob_gap": sums["behaviour_gap_sum"] / max(sums["behaviour_gap_count"], 1),
        "behaviour_logprob_gap_max": all_reduce_max(gap_max, world),
        "world_size": world.size,
        "total_tokens": sums["total_tokens"],
        "rollout_s": pending.rollout_s,
        "teacher_latency_s": teacher_wait,
    }


@torch.no_grad()
def evaluate_heldout(
    model, teacher, prompts: list[list[int]], config: TrainConfig, tokens: StudentTokens, world: World
) -> dict:
    """Mean truncated reverse KL to the teacher on the student's own rollouts of held-out prompts,
    sampled from the live weights; each rank evaluates its share, the means are over all of them."""
    share = len(prompts) // world.size
    first = world.rank * share
    engine = hf_rollouts(
        model, tokens, synced_processes=world.distributed and config.parallelism == "fsdp"
    )  # see make_rollout_engine
    rollouts = engine.generate(
        prompts[first : first + share],
        evaluation_seeds(config, share, first),
        top_p=config.top_p,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
    )
    batch = score_rollouts(teacher, rollouts, config, tokens)
    metrics = support_metrics(
        scored_logits(unwrap(model), batch), batch.teacher_ids, batch.teacher_logprobs, batch.mask
    )
    count = metrics.pop("num_positions")
    sums = all_reduce_sums(
        {name: value * count for name, value in metrics.items()}
        | {
            "positions": count,
            "completion_tokens": sum(r.completion_length for r in rollouts),
            "rollouts": len(rollouts),
        },
        world,
    )
    positions = max(sums.pop("positions"), 1)
    return {f"eval_{name}": sums[name] / positions for name in metrics} | {
        "eval_response_length": sums["completion_tokens"] / max(sums["rollouts"], 1)
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


def load_student(config: TrainConfig, checkpoint: Path | None, world: World):
    """The student (with its LoRA adapter when configured), wrapped for the world; and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = str(checkpoint / "model") if checkpoint else None
    tokenizer = AutoTokenizer.from_pretrained(saved or config.student)
    # A LoRA checkpoint holds the adapter only: the base weights come from config.student.
    base = config.student if config.lora_r or not saved else saved
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(rank_device(config.device, world))
    if config.lora_r:
        model = (
            load_lora(model, saved)
            if saved
            else add_lora(model, config.lora_r, config.lora_alpha, config.lora_target_modules, config.lora_dropout)
        )
    return wrap_model(model, config.parallelism, world), tokenizer


def current_weights(model):
    """(name, full tensor) of the student under its Hugging Face names, as a rollout engine loads them."""
    model = unwrap(model)
    if is_lora(model):
        return merged_weights(model)
    # FSDP: gathered on every rank (a collective); otherwise the plain state dict.
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)).items()


def make_rollout_engine(
    config: TrainConfig, model, tokens: StudentTokens, world: World, max_model_len: int
) -> RolloutEngine:
    if config.rollout_engine == "hf":
        # FSDP: each decoding step gathers parameters collectively, so every rank decodes as long as the longest.
        return hf_rollouts(model, tokens, synced_processes=world.distributed and config.parallelism == "fsdp")
    from student_trainer.vllm_rollouts import VllmRollouts

    return VllmRollouts(config.student, eos_ids=tokens.eos_ids, max_model_len=max_model_len)


def train(config: TrainConfig, *, resume: bool = False, evaluate_task: TaskEvaluator | None = None) -> list[dict]:
    """Run OPD training as configured (one process, or one rank under torchrun); returns the metric records."""
    world = init_world(config.device)
    try:
        return _train(config, world, resume, evaluate_task)
    finally:
        shutdown(world)


def _train(config: TrainConfig, world: World, resume: bool, evaluate_task: TaskEvaluator | None) -> list[dict]:
    if config.batch_size % (world.size * config.micro_batch_size):
        raise ValueError(
            f"batch_size {config.batch_size} must be a multiple of world size {world.size} x "
            f"micro_batch_size {config.micro_batch_size}"
        )
    if evaluate_task is not None and world.distributed:
        raise ValueError("evaluate_task runs in single-process training only")
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    checkpoint = latest_checkpoint(output) if resume else None
    model, tokenizer = load_student(config, checkpoint, world)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    prompts = PromptStream(load_prompts(config.prompts, tokenizer), config.seed)
    eval_prompts = load_prompts(config.eval_prompts, tokenizer)[: config.eval_size] if config.eval_prompts else []
    start = 0
    client_options = teacher_client_options(config)
    if checkpoint:
        state = load_trainer_state(checkpoint)
        if config.pin_teacher and state.teacher_pin:
            client_options["pin_teacher"] = state.teacher_pin  # the teacher this run trained against
        load_optimizer_state(checkpoint, model, optimizer, world)
        scheduler.load_state_dict(state.scheduler)
        restore_rng(state.rng)
        prompts.position, start = state.data_position, state.step
        log.info("resumed from %s (step %d, saved by %d processes)", checkpoint, start, state.world_size)
    metrics = None
    if world.is_main:
        (output / "config.json").write_text(json.dumps(config.__dict__, indent=2))
        metrics = MetricsLog(output / "metrics.jsonl", resume_step=start)
    tokens = StudentTokens(tokenizer)
    longest_prompt = max(len(p) for p in prompts.prompts + eval_prompts)
    engine = make_rollout_engine(config, model, tokens, world, longest_prompt + config.max_new_tokens)
    engine_version = start  # optimizer steps in the weights the engine samples with (vllm: the last push)
    if config.rollout_engine != "hf":
        engine.push_weights(current_weights(model))
    records = []

    def record_and_log(record: dict) -> None:
        records.append(record)
        if metrics is not None:
            metrics.write(record)

    def evaluation() -> dict:
        result = {}
        if eval_prompts:
            result |= evaluate_heldout(model, teacher, eval_prompts, config, tokens, world)
        if evaluate_task is not None:
            result |= evaluate_task(model)
        return result

    def produce(step: int, steps_done: int) -> PendingBatch:
        """Sample this rank's shard of `step`'s global batch and send it to the teacher (no waiting)."""
        shard = world.shard(prompts.next_batch(config.batch_size))
        seeds = rollout_seeds(config.seed, step, world.first_index(config.batch_size), len(shard))
        started = time.perf_counter()
        rollouts = engine.generate(
            shard, seeds, top_p=config.top_p, temperature=config.temperature, max_new_tokens=config.max_new_tokens
        )
        version = steps_done if config.rollout_engine == "hf" else engine_version
        scores = teacher.submit_score_many(teacher_requests(rollouts), config.top_k)
        return PendingBatch(rollouts, scores, time.perf_counter() - started, policy_lag=step - version)

    with TeacherClient(config.teacher, **client_options) as teacher:
        # mask_special_tokens: false is an ablation of the whole masking: the teacher's too.
        teacher.open_session(tokenizer_message(tokenizer), no_special_token_masking=not config.mask_special_tokens)
        if start == 0 and (eval_prompts or evaluate_task):
            record_and_log({"step": 0, **evaluation()})
        progress = tqdm(
            range(start, config.steps),
            initial=start,
            total=config.steps,
            desc="opd",
            unit="step",
            disable=not world.is_main,
        )
        # overlap_scoring: batch i+1 is sampled (with the weights before step i) while batch i is scored.
        pending = produce(start, start) if config.overlap_scoring else None
        for step in progress:
            started = time.perf_counter()
            if config.overlap_scoring:
                current = pending
                pending = produce(step + 1, step) if step + 1 < config.steps else None
            else:
                current = produce(step, step)
            record = {"step": step + 1}
            record |= optimizer_step(model, optimizer, scheduler, current, config, tokens, world)
            if config.rollout_engine != "hf" and (step + 1) % config.rollout_sync_every == 0:
                engine.push_weights(current_weights(model))
                engine_version = step + 1
            step_s = all_reduce_max(time.perf_counter() - started, world)
            record |= {"step_s": step_s, "tokens_per_s": record.pop("total_tokens") / step_s}
            last = step + 1 == config.steps
            if last or (config.eval_every and (step + 1) % config.eval_every == 0):
                record |= evaluation()
            record_and_log(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", rkl=f"{record['topk_rkl']:.4f}")
            if last or (config.save_every and (step + 1) % config.save_every == 0):
                state = TrainerState(
                    step=step + 1,
                    # A batch sampled ahead (overlap) is not trained yet: a resumed run samples it again.
                    data_position=prompts.position - (config.batch_size if pending else 0),
                    scheduler=scheduler.state_dict(),
                    rng=capture_rng(),
                    world_size=world.size,
                    teacher_pin=teacher.pin,
                )
                save_checkpoint(output, model, optimizer, tokenizer, state, config.keep_checkpoints, world)
    engine.close()
    return records
