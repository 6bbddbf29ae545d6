"""The synthetic task and the tiny models of the offline demo (DESIGN.md section 9).

Task: reverse a 6-digit string. The prompt is ``<bos>123456>`` and the answer is
``654321<eos>``. A 2-layer d=128 teacher learns it to ~100% in about a minute on one CPU
core; a 2-layer d=64 student stopped after a few supervised steps is a weak but learnable
starting point, so on-policy distillation visibly moves it within seconds.

Everything is built offline (no hub downloads) and is deterministic on CPU given the seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from student_trainer.demo import lookup, xtok
from student_trainer.demo.chars import character_tokenizer

# Bump when the task, the tokenizer or the training code changes meaning: it is part of
# the cache key, so cached models built by older code are not reused.
TASK_VERSION = 1

NUM_DIGITS = 6
SEPARATOR = ">"
# Fixed id order: pad=0, bos=1, eos=2, digits 3..12, separator 13.
VOCAB = ["<pad>", "<bos>", "<eos>", *"0123456789", SEPARATOR]
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

# Held-out problems are those whose digit string hashes into HELDOUT_BUCKETS of 100
# buckets; training problems are all others. The split is a property of the string,
# so train and held-out sets are disjoint whatever seeds or sizes are used.
HELDOUT_BUCKETS = 10
HELDOUT_SEED = 20_000_101


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer; encoding adds <bos> (never <eos>)."""
    return character_tokenizer(VOCAB, (PAD, BOS, EOS), add_bos=True)


# Tokenizers by name (Recipe.tokenizer): the demo's, the cross-tokenizer student's (xtok.py) and
# the tool task's (lookup.py).
TOKENIZERS = {"demo": build_tokenizer, "xtok": xtok.build_tokenizer, "tool": lookup.build_tokenizer}
VOCABULARIES = {"demo": VOCAB, "xtok": xtok.VOCAB, "tool": lookup.VOCAB}


@dataclass(frozen=True)
class Problem:
    prompt: str  # e.g. "123456>"
    answer: str  # e.g. "654321" (the model must then emit <eos>)


def is_heldout(digits: str) -> bool:
    bucket = int.from_bytes(hashlib.sha256(digits.encode()).digest()[:4], "little") % 100
    return bucket < HELDOUT_BUCKETS


def make_problems(n: int, seed: int, *, split: str = "train") -> list[Problem]:
    """`n` distinct problems of `split` ("train" or "heldout"), drawn with `seed`."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want_heldout = split == "heldout"
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    limit = 10**NUM_DIGITS * (HELDOUT_BUCKETS if want_heldout else 100 - HELDOUT_BUCKETS) // 200
    if n > limit:  # keep rejection sampling cheap: at most half of the split
        raise ValueError(f"at most {limit} distinct {split} problems, asked for {n}")
    while len(problems) < n:
        digits = "".join(rng.choice("0123456789") for _ in range(NUM_DIGITS))
        if digits in seen or is_heldout(digits) != want_heldout:
            continue
        seen.add(digits)
        problems.append(Problem(prompt=digits + SEPARATOR, answer=digits[::-1]))
    return problems


def heldout_problems(n: int = 1000) -> list[Problem]:
    """The fixed evaluation set: the first `n` held-out problems of HELDOUT_SEED."""
    return make_problems(n, HELDOUT_SEED, split="heldout")


def _config(vocab_size: int, hidden: int, heads: int, intermediate: int, tokenizer=None) -> transformers.LlamaConfig:
    """`tokenizer` gives the special ids of another vocabulary than the demo's."""
    ids = (
        (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        if tokenizer is not None
        else (VOCAB.index(PAD), VOCAB.index(BOS), VOCAB.index(EOS))
    )
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,  # 1 layer cannot learn reversal (DESIGN.md section 9)
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=32,  # >= 32 so the model also loads in vLLM's CPU backend
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=ids[0],
        bos_token_id=ids[1],
        eos_token_id=ids[2],
    )


def teacher_config(vocab_size: int) -> transformers.LlamaConfig:
    return _config(vocab_size, hidden=128, heads=4, intermediate=256)


def student_config(vocab_size: int, tokenizer=None) -> transformers.LlamaConfig:
    return _config(vocab_size, hidden=64, heads=2, intermediate=128, tokenizer=tokenizer)


def build_model(config: transformers.LlamaConfig, seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)  # the initial weights depend only on the seed
    return transformers.LlamaForCausalLM(config).float().eval()


def encode_problems(tokenizer, problems: list[Problem]) -> tuple[torch.Tensor, int | torch.Tensor]:
    """[N, T] ids of <bos> prompt answer <eos>, and where the answer is.

    With the demo tokenizer every row has the same layout: the second value is the prompt
    length (with <bos>). A tokenizer with multi-digit tokens (xtok.py) gives rows of several
    lengths: they are right-padded with <pad>, and the second value is the [N, T] targets,
    the row's ids on its answer and <eos> and -100 (no loss) on its prompt and padding.
    """
    eos = tokenizer.eos_token_id
    ids = [row + [eos] for row in tokenizer([p.prompt + p.answer for p in problems])["input_ids"]]
    prompt_lens = [len(row) for row in tokenizer([p.prompt for p in problems])["input_ids"]]
    if len({len(row) for row in ids}) == 1 and len(set(prompt_lens)) == 1:
        return torch.tensor(ids, dtype=torch.long), prompt_lens[0]
    width = max(len(row) for row in ids)
    seqs = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    targets = torch.full((len(ids), width), -100, dtype=torch.long)
    for index, (row, start) in enumerate(zip(ids, prompt_lens)):
        seqs[index, : len(row)] = torch.tensor(row)
        targets[index, start : len(row)] = seqs[index, start : len(row)]
    return seqs, targets


def answer_loss(model, seqs: torch.Tensor, answer: int | torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer and <eos> tokens given everything before them.

    `answer`: the prompt length of every row, or per-position targets (encode_problems).
    Padding after <eos> needs no attention mask: causal attention never looks ahead.
    """
    logits = model(input_ids=seqs[:, :-1], use_cache=False).logits
    if isinstance(answer, int):
        # logits[:, t] predicts seqs[:, t + 1]; the answer starts at position prompt_len.
        pred = logits[:, answer - 1 :]
        target = seqs[:, answer:]
    else:
        pred, target = logits, answer[:, 1:]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100)


def train_supervised(model, tokenizer, problems: list[Problem], **options: Any) -> list[float]:
    """Teacher-forced training on the answer tokens (fit's options); returns the loss of every step."""
    return fit(model, *encode_problems(tokenizer, problems), **options)


def fit(
    model,
    seqs: torch.Tensor,
    answer: int | torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup_frac: float = 0.05,
) -> list[float]:
    """Teacher-forced training of answer_loss over rows of `seqs`; returns the loss of every step.

    AdamW with linear warm-up and cosine decay (a constant 5e-3 is less reliable at
    reaching 100%), gradient clipping at 1. Batches are drawn with a generator seeded by
    `seed`, so the run is deterministic on CPU.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, int(steps * warmup_frac))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    for _ in range(steps):
        rows = torch.randint(len(seqs), (batch_size,), generator=gen)
        loss = answer_loss(model, seqs[rows], answer if isinstance(answer, int) else answer[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def greedy_answers(model, tokenizer, problems: list[Problem], *, batch_size: int = 256) -> list[str | None]:
    """Greedy answer text (before <eos>) per problem; None when no <eos> came in time."""
    eos = tokenizer.eos_token_id
    out: list[str | None] = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = tokenizer([p.prompt for p in chunk])["input_ids"]
        max_new = max(len(p.answer) for p in chunk) + 1  # answer plus <eos> (a token holds >= 1 digit)
        # Prompts of one length decode together, unpadded: with the demo tokenizer that is the
        # whole chunk; with multi-digit tokens (xtok.py) a few groups.
        groups: dict[int, list[int]] = {}
        for row, prompt in enumerate(prompts):
            groups.setdefault(len(prompt), []).append(row)
        answers: list[str | None] = [None] * len(chunk)
        for rows in groups.values():
            ids = torch.tensor([prompts[row] for row in rows])
            for _ in range(max_new):
                # Sequences are at most ~15 tokens: a full forward per step beats cache bookkeeping.
                next_ids = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
            for row, new in zip(rows, ids[:, -max_new:].tolist()):
                answers[row] = tokenizer.decode(new[: new.index(eos)]) if eos in new else None
        out += answers
    return out


def accuracy(model, tokenizer, problems: list[Problem], *, batch_size: int = 256) -> float:
    """Exact-match accuracy of greedy decoding."""
    answers = greedy_answers(model, tokenizer, problems, batch_size=batch_size)
    return sum(a == p.answer for a, p in zip(answers, problems)) / len(problems)


def has_doubled_digit(digits: str) -> bool:
    """Whether a digit repeats right after itself: xtok.py's student writes such a pair as one token."""
    return any(first == second for first, second in zip(digits, digits[1:]))


def accuracy_by_doubled_digit(model, tokenizer, problems: list[Problem]) -> dict[str, float]:
    """Greedy exact-match accuracy over all problems, and over those with and without a doubled digit
    (41% of 6-digit strings have one: a prompt the cross-tokenizer student reads as fewer tokens)."""
    right = [a == p.answer for a, p in zip(greedy_answers(model, tokenizer, problems), problems)]
    doubled = [has_doubled_digit(p.answer) for p in problems]

    def share(chosen: list[bool]) -> float:
        return sum(r for r, c in zip(right, chosen) if c) / max(1, sum(chosen))

    return {
        "accuracy": sum(right) / len(right),
        "accuracy_doubled_digit": share(doubled),
        "accuracy_no_doubled_digit": share([not d for d in doubled]),
    }


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a cached model; its hash names the cache directory."""

    name: str  # "teacher" or "student"
    hidden: int
    heads: int
    intermediate: int
    train_problems: int
    steps: int
    batch_size: int
    lr: float
    seed: int
    min_accuracy: float | None = None  # fail loudly instead of caching a useless model
    max_accuracy: float | None = None  # (the student must stay weak to have room to learn)

    tokenizer: str = "demo"  # a TOKENIZERS name

    def key(self) -> str:
        fields = asdict(self)
        if fields["tokenizer"] == "demo":
            del fields["tokenizer"]  # the demo models keep the keys (and caches) they had before the field
        blob = json.dumps(
            {"task_version": TASK_VERSION, "vocab": VOCABULARIES[self.tokenizer], **fields}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Calibrated with torch.set_num_threads(1) on the 2-core dev machine (held-out = 1000
# problems). Teacher: 100% held-out after 400 steps (~35-45 s; 800 steps, the DESIGN.md
# figure, also gives 100% but takes ~70 s and the loss is ~1e-3 by step 200 already).
TEACHER_RECIPE = Recipe(
    name="teacher",
    hidden=128,
    heads=4,
    intermediate=256,
    train_problems=50_000,
    steps=400,
    batch_size=128,
    lr=5e-3,
    seed=0,
    min_accuracy=0.99,
)
# Student: reversal is learned in a sudden jump (65 steps: 8%, 70: 17%, 72: 22%, 75: 29%,
# 80: 54%, 100: 100%), so a short run gives a weak start with the right output format.
# The bounds catch numerical drift (another torch build) moving it off the useful range.
STUDENT_RECIPE = Recipe(
    name="student",
    hidden=64,
    heads=2,
    intermediate=128,
    train_problems=50_000,
    steps=72,
    batch_size=128,
    lr=5e-3,
    seed=1,
    min_accuracy=0.05,
    max_accuracy=0.5,
)
# The cross-tokenizer student (opd-study's *_xtok variants): the same model and training with
# xtok.py's tokenizer. Its jump comes later (100 steps: 9%, 110: 11%, 116: 14%, 118: 17%,
# 120: 69%; each a separate run, the schedule spans its steps); 118 is a start close to the
# demo student's.
XTOK_STUDENT_RECIPE = replace(STUDENT_RECIPE, name="student-xtok", steps=118, tokenizer="xtok")
# A teacher that speaks the cross-tokenizer student's tokenizer (opd-study --xtok-teacher): the same model
# and training as TEACHER_RECIPE on xtok.py's canonical tokens (99.5% held-out), so that *_xtok variants
# run without cross-tokenizer scoring, a control for what the tokenizer costs the student by itself.
XTOK_TEACHER_RECIPE = replace(TEACHER_RECIPE, name="teacher-xtok", tokenizer="xtok")


@dataclass(frozen=True)
class OpdRecipe:
    """On-policy distillation settings that move the cached student (measured in-process).

    Truncated reverse KL over the teacher's top-K support (pad/bos removed), renormalised,
    on the student's own top-p rollouts, batch 64, AdamW lr 1e-3 constant, grad clip 1;
    held-out accuracy of the cached student (start 21.7%), three rollout seeds:
      K=12 (every non-special token): 74/87/77% after 150 steps, 96/97/91% after 200,
        ~15-20 s of training on one thread. Full-support reverse KL: 82% after 150.
      K=8: 51% after 150 steps, 88% after 200, ~92-95% at 225-275 (one seed): about 10% of
        the student's samples fall outside the teacher's top-8, whose tail ranking is noise
        for a teacher this sure of itself, and the truncated loss cannot push that mass down.
      lr 1.5e-3 (K=12) was worse (69% at 150); DESIGN.md reports lr 3e-3 collapsing.
    """

    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    top_k: int = 12
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = NUM_DIGITS + 1  # the answer and <eos>


OPD_RECIPE = OpdRecipe()
EVAL_PROBLEMS = 1000


def recipe_model(recipe: Recipe, tokenizer) -> transformers.LlamaForCausalLM:
    """The untrained model of `recipe` for `tokenizer`'s vocabulary."""
    config = _config(len(tokenizer), recipe.hidden, recipe.heads, recipe.intermediate, tokenizer=tokenizer)
    return build_model(config, recipe.seed)


def build_and_train(recipe: Recipe, tokenizer) -> tuple[transformers.LlamaForCausalLM, float]:
    model = recipe_model(recipe, tokenizer)
    problems = make_problems(recipe.train_problems, recipe.seed, split="train")
    train_supervised(
        model, tokenizer, problems, steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed
    )
    return model, accuracy(model, tokenizer, heldout_problems(EVAL_PROBLEMS))


def prepare(cache_dir: Path, recipe: Recipe, build=None) -> Path:
    """Build, train and cache the model + tokenizer of `recipe` (with `build`, default
    build_and_train: (recipe, tokenizer) -> (model, held-out accuracy)); reuse the cache if present.

    The directory is named by the recipe hash and appears atomically (written into a
    temporary sibling, then renamed), so a crash never leaves a half-written model that
    a later call would trust.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{recipe.name}-{recipe.key()}"
    if (final / "demo_recipe.json").exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = TOKENIZERS[recipe.tokenizer]()
    model, acc = (build or build_and_train)(recipe, tokenizer)
    if recipe.min_accuracy is not None and acc < recipe.min_accuracy:
        raise RuntimeError(f"{recipe.name}: held-out accuracy {acc:.3f} < {recipe.min_accuracy}")
    if recipe.max_accuracy is not None and acc > recipe.max_accuracy:
        raise RuntimeError(f"{recipe.name}: held-out accuracy {acc:.3f} > {recipe.max_accuracy}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Written last: its presence marks a complete directory.
        (tmp / "demo_recipe.json").write_text(
            json.dumps({**asdict(recipe), "task_version": TASK_VERSION, "heldout_accuracy": acc}, indent=2)
        )
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "demo_recipe.json").exists():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare_teacher(cache_dir: Path, recipe: Recipe = TEACHER_RECIPE) -> Path:
    return prepare(cache_dir, recipe)


def prepare_student(cache_dir: Path, recipe: Recipe = STUDENT_RECIPE) -> Path:
    return prepare(cache_dir, recipe)
