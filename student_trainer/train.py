"""The OPD training loop: rollouts with the student, scores from the teacher, a loss, a step.

    prompts -> rollouts (top-p) -> teacher top-K (streamed) -> loss over masked positions -> AdamW

`train(config)` is the whole run, in one process or one rank of a torchrun job
(distributed.py); `Run` holds its state; one step over a batch is step.py.

Policy lag: the number of optimizer steps between the weights that sampled a batch
and the weights it trains. 0 with the hf rollout engine; with vLLM rollouts it is the
steps since the last weight push (rollout_sync_every - 1 at most); max_staleness N
adds up to N (batch i+N is sampled with the weights that train batch i, before step i, and
the teacher scores it while steps i..i+N-1 train).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

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
from student_trainer.config import TrainConfig
from student_trainer.data import PromptStream, load_prompts
from student_trainer.distributed import World, all_reduce_max, init_world, rank_device, shutdown, unwrap, wrap_model
from student_trainer.environments import Environment, load_environment
from student_trainer.head import verify_head, verify_packing
from student_trainer.lora import add_lora, is_lora, load_lora, merged_weights
from student_trainer.messages import tokenizer_message
from student_trainer.rollouts import RolloutEngine, rollout_seeds
from student_trainer.step import (
    PendingBatch,
    StudentTokens,
    evaluate_heldout,
    hf_rollouts,
    optimizer_step,
    sample_rollouts,
    teacher_requests,
)
from student_trainer.teacher_router import TeacherRouter

log = logging.getLogger(__name__)

TaskEvaluator = Callable[[torch.nn.Module], dict[str, float]]


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
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    # The loss computes the head's logits itself, and packing needs the attention to keep rollouts apart.
    verify_head(model)
    if config.packing:
        verify_packing(model)
    return wrap_model(model, config.parallelism, world), tokenizer


def enable_activation_checkpointing(model) -> None:
    """transformers' checkpointing of every decoder layer, non-reentrant (LoRA and FSDP need no input grads)."""
    if hasattr(model, "activation_checkpointing_enable"):  # the name in transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
        return hf_rollouts(model, tokens, config, world)
    from student_trainer.vllm_rollouts import VllmRollouts

    return VllmRollouts(config.student, eos_ids=tokens.eos_ids, max_model_len=max_model_len)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    evaluate_task: TaskEvaluator | None = None,
    environment: Environment | None = None,
) -> list[dict]:
    """Run OPD training as configured (one process, or one rank under torchrun); returns the metric records.

    `environment`: multi-turn episodes with this one (else config.environment's, if set)."""
    world = init_world(config.device)
    try:
        if config.batch_size % world.size:
            below = config.batch_size - config.batch_size % world.size
            raise ValueError(
                f"batch_size {config.batch_size} must be a multiple of the world size {world.size} (every "
                f"process samples an equal share): set --batch-size to {below or world.size} or {below + world.size}"
            )
        if evaluate_task is not None and world.distributed:
            raise ValueError("evaluate_task runs in single-process training only")
        if environment is None and config.environment:
            environment = load_environment(config.environment)
        run = Run(config, world, resume, evaluate_task, environment)
        try:
            return run.loop()
        finally:
            run.engine.close()
    finally:
        shutdown(world)


class Run:
    """One training run on this rank: the student, its optimizer, the prompts and the rollout engine,
    restored from the latest checkpoint when resuming; `loop` takes the steps."""

    def __init__(
        self,
        config: TrainConfig,
        world: World,
        resume: bool,
        evaluate_task: TaskEvaluator | None,
        environment: Environment | None,
    ) -> None:
        self.config, self.world, self.evaluate_task, self.environment = config, world, evaluate_task, environment
        output = self.output = Path(config.output)
        output.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        checkpoint = latest_checkpoint(output) if resume else None
        self.model, self.tokenizer = load_student(config, checkpoint, world)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.prompts = PromptStream(load_prompts(config.prompts, self.tokenizer), config.seed)
        self.eval_prompts = (
            load_prompts(config.eval_prompts, self.tokenizer)[: config.eval_size] if config.eval_prompts else []
        )
        self.start = 0
        self.client_options = teacher_client_options(config)
        # The teachers the prompts name ("" the server's default), in a fixed order on every rank.
        self.teacher_names = tuple(sorted({p.teacher for p in self.prompts.prompts + self.eval_prompts}))
        self.teacher_pins: dict[str, str] = {}
        if checkpoint:
            self._restore(checkpoint)
        self.records: list[dict] = []
        self.metrics = None
        if world.is_main:
            (output / "config.json").write_text(json.dumps(config.__dict__, indent=2))
            self.metrics = MetricsLog(output / "metrics.jsonl", resume_step=self.start)
        self.tokens = StudentTokens(self.tokenizer)
        longest_prompt = max(len(p.ids) for p in self.prompts.prompts + self.eval_prompts)
        self.engine = make_rollout_engine(
            config, self.model, self.tokens, world, longest_prompt + self._completion_tokens()
        )
        self.engine_version = self.start  # optimizer steps in the weights the engine samples with (vllm: last push)
        if config.rollout_engine != "hf":
            self.engine.push_weights(current_weights(self.model))

    def _completion_tokens(self) -> int:
        """The longest completion: one turn, or a whole episode of turns and observations."""
        return self.config.rollout_tokens if self.environment is not None else self.config.max_new_tokens

    def _restore(self, checkpoint: Path) -> None:
        state = load_trainer_state(checkpoint)
        if self.config.pin_teacher:  # the teachers this run trained against
            self.teacher_pins = state.teacher_pins or ({"": state.teacher_pin} if state.teacher_pin else {})
        load_optimizer_state(checkpoint, self.model, self.optimizer, self.world)
        self.scheduler.load_state_dict(state.scheduler)
        restore_rng(state.rng)
        self.prompts.position, self.start = state.data_position, state.step
        log.info("resumed from %s (step %d, saved by %d processes)", checkpoint, self.start, state.world_size)

    def loop(self) -> list[dict]:
        config = self.config
        with TeacherRouter(
            config.teacher, self.teacher_names, self.teacher_pins, config.teacher_endpoints, **self.client_options
        ) as teacher:
            # mask_special_tokens: false is an ablation of the whole masking: the teacher's too.
            teacher.open_sessions(
                tokenizer_message(self.tokenizer), no_special_token_masking=not config.mask_special_tokens
            )
            if self.start == 0 and (self.eval_prompts or self.evaluate_task):
                self._record({"step": 0, **self._evaluation(teacher)})
            progress = tqdm(
                range(self.start, config.steps),
                initial=self.start,
                total=config.steps,
                desc="opd",
                unit="step",
                disable=not self.world.is_main,
            )
            # max_staleness N: batches step+1..step+N are on their way while step trains.
            ahead = deque(
                self._produce(teacher, index, self.start)
                for index in range(self.start, min(self.start + config.max_staleness, config.steps))
            )
            for step in progress:
                started = time.perf_counter()  # step_s counts the rollouts of the step too
                if step + config.max_staleness < config.steps:
                    ahead.append(self._produce(teacher, step + config.max_staleness, step))
                current = ahead.popleft()
                record = self._step(teacher, step, current, started)
                progress.set_postfix(loss=f"{record['loss']:.4f}", rkl=f"{record['topk_rkl']:.4f}")
                if step + 1 == config.steps or (config.save_every and (step + 1) % config.save_every == 0):
                    # Batches sampled ahead are not trained yet: a resumed run samples them again.
                    self._save(step + 1, teacher, ahead=len(ahead))
        return self.records

    def _produce(self, teacher: TeacherRouter, step: int, steps_done: int) -> PendingBatch:
        """Sample this rank's shard of `step`'s global batch and send it to the teacher (no waiting)."""
        config = self.config
        shard = self.world.shard(self.prompts.next_batch(config.batch_size))
        seeds = rollout_seeds(config.seed, step, self.world.first_index(config.batch_size), len(shard))
        started = time.perf_counter()
        rollouts = sample_rollouts(
            self.engine, shard, seeds, config, self.tokens, self.environment, candidates=config.candidates
        )
        version = steps_done if config.rollout_engine == "hf" else self.engine_version
        teachers = [prompt.teacher for prompt in shard]
        requests = teacher_requests(rollouts, shard, config.teacher_chat)
        scores = teacher.submit_score_many(requests, teachers, config.top_k)
        return PendingBatch(
            rollouts, scores, time.perf_counter() - started, step - version, teachers, self.teacher_names
        )

    def _step(self, teacher: TeacherRouter, step: int, current: PendingBatch, started: float) -> dict:
        """The optimizer step, a weight push and an evaluation when due; the step's record, logged."""
        config = self.config
        record = {"step": step + 1}
        record |= optimizer_step(self.model, self.optimizer, self.scheduler, current, config, self.tokens, self.world)
        if config.rollout_engine != "hf" and (step + 1) % config.rollout_sync_every == 0:
            self.engine.push_weights(current_weights(self.model))
            self.engine_version = step + 1
        step_s = all_reduce_max(time.perf_counter() - started, self.world)
        record |= {"step_s": step_s, "tokens_per_s": record.pop("total_tokens") / step_s}
        if step + 1 == config.steps or (config.eval_every and (step + 1) % config.eval_every == 0):
            record |= self._evaluation(teacher)
        self._record(record)
        return record

    def _evaluation(self, teacher: TeacherRouter) -> dict:
        result = {}
        if self.eval_prompts:
            result |= evaluate_heldout(
                self.model, teacher, self.eval_prompts, self.config, self.tokens, self.world, self.environment
            )
        if self.evaluate_task is not None:
            result |= self.evaluate_task(self.model)
        return result

    def _record(self, record: dict) -> None:
        self.records.append(record)
        if self.metrics is not None:
            self.metrics.write(record)

    def _save(self, step: int, teacher: TeacherRouter, ahead: int) -> None:
        config = self.config
        state = TrainerState(
            step=step,
            data_position=self.prompts.position - config.batch_size * ahead,
            scheduler=self.scheduler.state_dict(),
            rng=capture_rng(),
            world_size=self.world.size,
            teacher_pin=teacher.pins.get(""),
            teacher_pins=teacher.pins,
        )
        save_checkpoint(
            self.output, self.model, self.optimizer, self.tokenizer, state, config.keep_checkpoints, self.world
        )
