"""Training configuration: one dataclass, mirrored by YAML files and CLI flags.

Precedence: defaults < --config FILE.yaml < flags given on the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

LOSSES = ("topk_rkl", "topk_rkl_unnormalized", "sampled_token")
ROLLOUT_ENGINES = ("hf", "vllm")
PARALLELISMS = ("ddp", "fsdp")
LR_SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    student: str = ""  # Hugging Face model directory (or hub id) of the student
    # The teacher service: HOST:PORT, a comma-separated list of them (requests are spread over
    # the replicas that are up), or dns:///NAME:PORT (every address of NAME, round robin).
    teacher: str = "127.0.0.1:50051"
    # Teachers that prompts name and another deployment serves: NAME -> its target (as `teacher`);
    # that deployment must host it by that name (opd-teacher serve --teacher NAME=...).
    teacher_endpoints: dict[str, str] = dataclasses.field(default_factory=dict)
    # JSONL, one {"prompt": "..."} or {"messages": [...]} per line, optionally with "teacher_messages":
    # a privileged prompt the teacher reads instead (data.load_prompts).
    prompts: str = ""
    # Chat prompts reach the teacher as messages, which it renders with its own chat template;
    # false: it reads the student's rendering as tokens (a teacher without a chat template).
    teacher_chat: bool = True
    output: str = "outputs/run"
    steps: int = 100
    # Loss: teacher top-K local support matching (renormalised), its unnormalised
    # ablation, or the sampled-token OPD baseline.
    loss: str = "topk_rkl"
    top_k: int = 32
    # The student's own top-M ids at each position (0: none), scored by the teacher too: the
    # topk_rkl support becomes the union of the teacher's top-K and these (losses.union_support),
    # so mass the student puts on its own candidates outside the teacher's top-K is in the loss.
    candidates: int = 0
    # Train on this share of each micro-batch's loss-carrying positions only: those where the
    # student's entropy (from the training forward, no gradient) is highest (1.0: all of them;
    # the 0.2 recipe trains where the student is still choosing). Logged: entropy_mean over all
    # positions, entropy_trained_mean over the trained ones, trained_positions.
    entropy_top_ratio: float = 1.0
    gamma: float = 0.0  # sampled_token only: discount of the return-to-go (0 = per token)
    # Special targets carry no loss and leave the support (EOS stays); false turns masking off
    # in the trainer and in the teacher's session (OpenSession no_special_token_masking).
    mask_special_tokens: bool = True
    # Rollouts.
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = 128  # per student turn
    # Multi-turn rollouts (environments.py): an environment as module:callable (empty: one turn per
    # prompt), the student's turns per episode, and the tokens of the whole completion (turns and
    # the observations between them; 0: max_turns * max_new_tokens).
    environment: str = ""
    max_turns: int = 4
    max_rollout_tokens: int = 0
    # False (an ablation): observations are scored by the teacher and trained on like the student's turns.
    mask_observations: bool = True
    batch_size: int = 8  # rollouts per optimizer step, over all processes (the global batch)
    # Rollouts per forward/backward of one process (gradient accumulation); a process with a smaller
    # share of the batch takes it in one, and the last micro-batch may be smaller than the others.
    micro_batch_size: int = 8
    # hf: generate with the model being trained. vllm: a colocated vLLM engine (in this process)
    # that gets the trainer's weights every rollout_sync_every steps (policy lag up to N - 1).
    rollout_engine: str = "hf"
    rollout_sync_every: int = 1
    # Policy lag allowed: 0 samples, scores and trains each batch in turn; N keeps N batches sampled
    # ahead (with weights up to N steps old) while the teacher scores them and the step trains.
    max_staleness: int = 0
    # Under torchrun: ddp (replicated weights) or fsdp (fully_shard per decoder layer).
    parallelism: str = "ddp"
    # LoRA (PEFT): rank 0 trains the whole model; otherwise only adapters on these modules.
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: ["all-linear"])
    # Precision of the training forward and backward: float32, or bfloat16 autocast over float32
    # weights (the HF Trainer's bf16 mode: weights, gradients and optimizer state stay float32,
    # matmuls run in bfloat16). Rollouts sample in float32 either way.
    dtype: str = "float32"
    # Recompute each decoder layer's activations in the backward pass: less memory, more compute.
    activation_checkpointing: bool = False
    # Micro-batches packed several rollouts to a row (first fit into rows as long as the longest
    # rollout), not one padded row each; the student must keep packed sequences apart, which is
    # checked at start-up (with flash attention they run as variable-length sequences).
    packing: bool = False
    # Optimizer.
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    max_grad_norm: float = 1.0
    # Evaluation on held-out prompts: mean truncated reverse KL to the teacher.
    eval_prompts: str = ""  # JSONL like prompts; empty = no evaluation
    eval_every: int = 0  # steps between evaluations (0 = only before and after training)
    eval_size: int = 64
    # Bookkeeping.
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    device: str = "cpu"
    teacher_timeout_s: float = 300.0
    # Teacher security: a file holding this trainer's API key (else the environment variable
    # OPD_TEACHER_API_KEY; neither: no key); TLS when a CA (or teacher_tls) is given, with a
    # client certificate and key for mutual TLS; the name to check the teacher's certificate
    # against when it is not the address's host.
    teacher_api_key_file: str = ""
    teacher_tls: bool = False
    teacher_tls_ca: str = ""
    teacher_tls_cert: str = ""
    teacher_tls_key: str = ""
    teacher_tls_server_name: str = ""
    # Refuse to go on if the teacher's model or weights change under the same address.
    pin_teacher: bool = False

    @property
    def rollout_tokens(self) -> int:
        """The most completion tokens of one rollout, all turns and observations together."""
        return self.max_rollout_tokens or self.max_turns * self.max_new_tokens

    def validate(self) -> None:
        problems = []
        if not self.student:
            problems.append("student (--student) is required")
        if not self.prompts:
            problems.append("prompts (--prompts) is required")
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.gamma <= 1.0:
            problems.append(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        for name, target in self.teacher_endpoints.items():
            if not name or not target:
                problems.append(f"teacher_endpoints maps a teacher name to its HOST:PORT, got {name!r}: {target!r}")
        if bool(self.teacher_tls_cert) != bool(self.teacher_tls_key):
            problems.append("teacher_tls_cert and teacher_tls_key go together (mutual TLS)")
        if self.rollout_engine not in ROLLOUT_ENGINES:
            problems.append(f"rollout_engine must be one of {ROLLOUT_ENGINES}, got {self.rollout_engine!r}")
        if self.rollout_sync_every < 1:
            problems.append(f"rollout_sync_every must be >= 1, got {self.rollout_sync_every}")
        if self.parallelism not in PARALLELISMS:
            problems.append(f"parallelism must be one of {PARALLELISMS}, got {self.parallelism!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_staleness < 0:
            problems.append(f"max_staleness must be >= 0 (0 = synchronous), got {self.max_staleness}")
        if self.candidates < 0:
            problems.append(f"candidates must be >= 0 (0 = the teacher's top-K alone), got {self.candidates}")
        if self.candidates and self.loss == "sampled_token":
            problems.append("candidates need a top-K loss (topk_rkl or its ablation), not sampled_token")
        if not 0.0 < self.entropy_top_ratio <= 1.0:
            problems.append(f"entropy_top_ratio must be in (0, 1] (1 = every position), got {self.entropy_top_ratio}")
        if self.max_turns < 1:
            problems.append(f"max_turns must be >= 1, got {self.max_turns}")
        if self.max_rollout_tokens < 0:
            problems.append(
                f"max_rollout_tokens must be >= 0 (0 = max_turns * max_new_tokens), got {self.max_rollout_tokens}"
            )
        if self.lora_r < 0:
            problems.append(f"lora_r must be >= 0 (0 = no LoRA), got {self.lora_r}")
        for name in ("batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, updated from the YAML file at `path`, then from `overrides` (None values ignored)."""
    values: dict[str, Any] = {}
    if path:
        values = yaml.safe_load(Path(path).read_text()) or {}
        known = {field.name for field in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown keys in {path}: {unknown}; known keys: {sorted(known)}")
    values.update({key: value for key, value in overrides.items() if value is not None})
    config = TrainConfig(**values)
    config.validate()
    return config
