"""opd-study's held-out measurements: the same for every variant, whatever its training settings."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from transformers import AutoTokenizer

from student_trainer.batch import mask_fractions, student_scores
from student_trainer.config import TrainConfig
from student_trainer.data import Prompt, load_prompts
from student_trainer.demo import task
from student_trainer.messages import tokenizer_message
from student_trainer.step import StudentTokens, evaluation_seeds, hf_rollouts, score_rollouts
from student_trainer.teacher_router import TeacherRouter


class HeldoutEvaluator:
    """`evaluate_task` for train(): the same held-out measurements for every variant.

    accuracy: greedy exact match, also over the problems whose answer has a doubled digit and over
    the others (task.accuracy_by_doubled_digit). On the student's own rollouts of held-out prompts
    (sampled with the evaluation config, top-p 1.0, fixed seed): heldout_rkl, the truncated renormalised
    reverse KL over the positions that carry a loss (as train.evaluate_heldout); heldout_masked,
    the share of completion positions masked (the student wrote a special token there);
    heldout_support_mass, the student's mass on the teacher's non-special support over every
    completion position. The reverse KL cannot see a student that drifts into special tokens
    (they are outside the renormalised support); the last two can.
    """

    def __init__(
        self,
        client: TeacherRouter,
        tokenizer,
        problems: list[task.Problem],
        prompts: list[Prompt],
        config: TrainConfig,
    ) -> None:
        """`client` has a session open for `tokenizer`; `prompts` are tokenized with it."""
        self.client, self.tokenizer, self.problems, self.prompts = client, tokenizer, problems, prompts
        self.config = config
        self.tokens = StudentTokens(tokenizer)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        rollouts = hf_rollouts(model, self.tokens).generate(
            [prompt.ids for prompt in self.prompts],
            evaluation_seeds(self.config, len(self.prompts)),
            top_p=self.config.top_p,
            temperature=self.config.temperature,
            max_new_tokens=self.config.max_new_tokens,
        )
        batch = score_rollouts(self.client, rollouts, self.prompts, self.config, self.tokens)
        student = student_scores(model, batch)
        on_loss = student.metrics(batch, batch.mask)
        on_all = student.metrics(batch, batch.valid)
        return {
            **task.accuracy_by_doubled_digit(model, self.tokenizer, self.problems),
            "heldout_rkl": on_loss["topk_rkl"],
            "heldout_masked": mask_fractions(batch)["masked"],
            "heldout_support_mass": on_all["student_support_mass"],
            "heldout_response_length": sum(r.completion_length for r in rollouts) / len(rollouts),
        }


def open_evaluator(
    stack: ExitStack, target: str, student: Path, problems: list[task.Problem], heldout: Path, max_new_tokens: int
) -> tuple[HeldoutEvaluator, int]:
    """A HeldoutEvaluator for `student` with its own client and session (its tokenizer's); and max_k."""
    tokenizer = AutoTokenizer.from_pretrained(student)  # as train() loads it
    client = stack.enter_context(TeacherRouter(target, [""]))
    client.open_sessions(tokenizer_message(tokenizer))  # a cross-tokenizer session if it is not the teacher's
    max_k = client.clients[""].get_info().max_k
    config = TrainConfig(
        student=str(student),
        prompts="-",
        top_k=max_k,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        seed=0,
    )
    evaluator = HeldoutEvaluator(client, tokenizer, problems, load_prompts(heldout, tokenizer), config)
    return evaluator, max_k
