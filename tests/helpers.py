"""Helpers shared by test modules: float64 references, request builders, a teacher subprocess."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from opd.tensors import to_tensor
from opd.v1 import teacher_pb2
from student_trainer.client import TeacherScores
from teacher_server.engines import ScoringJob
from teacher_server.launch import TeacherProcess
from testkit.tiny_model import SPECIAL_TOKEN, TINY_VOCAB

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # float32 engine vs float64 reference, log-probabilities
THINK = 3  # the tiny model's SPECIAL_TOKEN id
EOS = 2
EXCLUDED = np.array([0, 1, THINK])  # the tiny teacher's special tokens other than EOS: never in the support
# Text that tokenizers split in odd places (emoji sequences, CJK, combining marks, digits, specials).
PIECES = [
    "🙂",
    "👩‍👩‍👧",
    "北京",
    "東京タワー",
    "e\u0301",
    "n\u0303o",
    "Å",
    "  ",
    "   \t",
    "\n\n",
    "\r\n",
    " 130",
    "2024",
    "1234567",
    "3.14",
    " eggs",
    "Janet’s",
    "<think>",
    "<|im_end|>",
    "[INST]",
    "\u00a0",
    "x",
    "ß",
    "ﬁ",
]


def reference(model, tokens: np.ndarray, score_from: int, temperature: float = 1.0) -> np.ndarray:
    """float64 [P, V]: row p = log p(. | tokens[:score_from + p]) at `temperature`."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens.astype(np.int64))[None], use_cache=False).logits[0]
    logits = logits.double()[score_from - 1 : len(tokens) - 1] / temperature
    return torch.log_softmax(logits, dim=-1).numpy()


def check_against_reference(scores, job: ScoringJob, ref: np.ndarray) -> None:
    tokens, score_from, top_k = job.token_ids, job.score_from, job.top_k
    positions = len(tokens) - score_from
    vocab = ref.shape[1]
    assert scores.ids.shape == (positions, top_k) and scores.ids.dtype == np.int32
    assert scores.logprobs.shape == (positions, top_k) and scores.logprobs.dtype == np.float32
    assert scores.token_logprobs.shape == (positions,) and scores.token_logprobs.dtype == np.float32

    targets = tokens[score_from:].astype(np.int64)
    np.testing.assert_allclose(scores.token_logprobs, ref[np.arange(positions), targets], rtol=0, atol=TOL)

    allowed = np.setdiff1d(np.arange(vocab), job.exclude_ids)
    valid = min(top_k, len(allowed))
    assert (scores.ids[:, valid:] == -1).all()
    assert np.isneginf(scores.logprobs[:, valid:]).all()
    ids, logprobs = scores.ids[:, :valid].astype(np.int64), scores.logprobs[:, :valid]
    assert np.isfinite(logprobs).all()
    assert np.isin(ids, allowed).all(), "an excluded id was returned in the support"
    # Every returned log-probability is the reference's for that id, normalised over the full vocabulary.
    np.testing.assert_allclose(logprobs, np.take_along_axis(ref, ids, axis=1), rtol=0, atol=TOL)
    assert (np.diff(logprobs, axis=1) <= 0).all(), "support not sorted by decreasing log-probability"

    for row in range(positions):
        assert len(set(ids[row])) == valid, f"row {row}: duplicate ids {ids[row]}"
        order = allowed[np.argsort(-ref[row, allowed], kind="stable")]
        expected = order[:valid]
        values = ref[row, order]
        if valid < len(order):
            # The returned ids are the K largest: nothing left out beats the smallest one returned.
            assert ref[row, ids[row]].min() >= values[valid] - TOL, f"row {row}: not the top {valid}"
            tie_at_boundary = values[valid - 1] - values[valid] <= TOL
        else:
            tie_at_boundary = False
        if not tie_at_boundary:
            assert set(ids[row]) == set(expected), f"row {row}: {ids[row]} vs reference {expected}"
        # Position by position, except between reference values that (nearly) tie.
        gaps = -np.diff(values[: valid + 1]) if valid < len(order) else -np.diff(values[:valid])
        for j in range(valid):
            tied_left = j > 0 and gaps[j - 1] <= TOL
            tied_right = j < len(gaps) and gaps[j] <= TOL
            if not (tied_left or tied_right):
                assert ids[row, j] == expected[j], f"row {row}, rank {j}: {ids[row, j]} vs {expected[j]}"


def score_request(session_id: str, tokens, score_from: int, top_k: int, request_id: int = 0):
    return teacher_pb2.ScoreRequest(
        request_id=request_id,
        session_id=session_id,
        tokens=to_tensor(np.asarray(tokens, dtype=np.int32)),
        score_from=score_from,
        top_k=top_k,
    )


def teacher_tokenizer_message(tiny_model: Path) -> teacher_pb2.HFTokenizer:
    return teacher_pb2.HFTokenizer(
        tokenizer_json=(tiny_model / "tokenizer.json").read_text(),
        special_tokens=["<pad>", "<bos>", "<eos>", SPECIAL_TOKEN],
        eos_tokens=["<eos>"],
    )


def start_teacher(model: Path, tmp: Path, *extra: str, port: int | None = None) -> TeacherProcess:
    """The launcher's teacher with torch on one thread and a 20 s drain, its log under `tmp`."""
    log = tmp / f"teacher-{time.monotonic_ns()}.log"
    return TeacherProcess(
        model, port=port, extra=("--grace", "20", *extra), env={"OMP_NUM_THREADS": "1"}, log=log, cwd=ROOT
    )


MAX_K = 32  # server_config's default


def open_same_as_teacher(stub, temperature: float = 0.0, metadata=None) -> str:
    request = teacher_pb2.OpenSessionRequest(
        tokenizer=teacher_pb2.StudentTokenizer(same_as_teacher=True), temperature=temperature
    )
    return stub.OpenSession(request, metadata=metadata, timeout=30).session_id


def make_rollouts(count: int, seed: int) -> list[tuple[np.ndarray, int, int]]:
    """(tokens, score_from, top_k) triples of varied lengths, prompts and K; ids avoid the specials."""
    rng = np.random.default_rng(seed)
    rollouts = []
    for _ in range(count):
        length = int(rng.integers(6, 90))
        tokens = rng.integers(4, TINY_VOCAB, size=length).astype(np.int32)
        rollouts.append((tokens, int(rng.integers(1, length)), int(rng.integers(1, MAX_K + 1))))
    return rollouts


def assert_same_scores(got: TeacherScores, expected: TeacherScores) -> None:
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_array_equal(got.mask, expected.mask)
    np.testing.assert_array_equal(got.reason, expected.reason)
    atol = 1e-5  # batched with other requests, float32 sums may differ in the last bits
    np.testing.assert_allclose(got.logprobs, expected.logprobs, rtol=0, atol=atol)
    np.testing.assert_allclose(got.token_logprobs, expected.token_logprobs, rtol=0, atol=atol)


def wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def sigterm_under_load(
    process,
    clients: list[Callable[[], None]],
    watch_health: Callable[[], None],
    answered: Callable[[], int],
    enough: int,
    signalled: threading.Event,
    exited: threading.Event | None = None,
) -> None:
    """Run the clients until `answered()` reaches `enough`, then SIGTERM the teacher while
    `watch_health` runs; the teacher must exit 0 within a minute and every client finish."""
    with ThreadPoolExecutor(len(clients) + 1) as pool:
        running = [pool.submit(client) for client in clients]
        while answered() < enough:  # under load
            time.sleep(0.05)
            assert process.poll() is None
        watcher = pool.submit(watch_health)
        time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        signalled.set()
        assert process.wait(timeout=60) == 0
        if exited is not None:
            exited.set()
        for future in [*running, watcher]:
            future.result(timeout=60)
