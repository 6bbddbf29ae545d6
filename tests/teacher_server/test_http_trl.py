"""TRL's own clients against our HTTP port: the drop-in claim of the vLLM dialect, with the real code.

TRL 1.16's `VLLMClient` refuses to start unless vLLM is importable, so these tests run in the
vLLM environment (.ci/vllm-venv.sh installs TRL there; .ci/run runs this file with it) and skip
elsewhere. The key travels as the password of the URL (`http://TENANT:KEY@host:port`), the
only way that client can send one.
"""

from __future__ import annotations

import secrets

import grpc
import numpy as np
import pytest

from opd.tensors import from_tensor, to_tensor
from opd.v1 import teacher_pb2, teacher_pb2_grpc
from teacher_server.auth import ApiKeys
from tests.conftest import LiveServer, server_config
from tests.helpers import make_rollouts, open_same_as_teacher
from testkit.tiny_model import build_tiny_model

vllm_client = pytest.importorskip(
    "trl.generation.vllm_client", reason="TRL with vLLM importable: run in .venv-vllm (.ci/vllm-venv.sh)"
)

KEY = "trl-" + secrets.token_hex(16)
TOP_K = 8
TOL = 1e-5
STEPS = 30


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    keys = tmp_path_factory.mktemp("trl-keys") / "keys.txt"
    keys.write_text(f"trainer {KEY}\n")
    live = LiveServer(server_config(tiny_model, http_port=0, api_keys=ApiKeys.load(keys)))
    yield live
    live.stop()


def test_vllm_client_gets_the_grpc_top_k_and_logprobs(server):
    client = vllm_client.VLLMClient(
        base_url=f"http://trainer:{KEY}@127.0.0.1:{server.server.http_port}", connection_timeout=30
    )
    rollouts = make_rollouts(16, seed=11)
    sequences = [tokens.tolist() for tokens, _, _ in rollouts]
    prompt_lengths = [score_from for _, score_from, _ in rollouts]
    answer = client.get_sequence_logprobs(sequences, prompt_lengths, top_logprobs=TOP_K, chunk_size=4)
    with grpc.insecure_channel(server.target) as channel:
        stub = teacher_pb2_grpc.TeacherStub(channel)
        metadata = [("authorization", f"Bearer {KEY}")]
        session_id = open_same_as_teacher(stub, 1.0, metadata)
        worst, positions = 0.0, 0
        for index, (tokens, score_from, _) in enumerate(rollouts):
            request = teacher_pb2.ScoreRequest(
                session_id=session_id, tokens=to_tensor(tokens), score_from=score_from, top_k=TOP_K
            )
            reference = stub.Score(request, metadata=metadata, timeout=30)
            ids = from_tensor(reference.ids, name="ids")
            logprobs = from_tensor(reference.logprobs, name="logprobs")
            actual = from_tensor(reference.token_logprobs, name="token_logprobs")
            assert np.asarray(answer["logprob_token_ids"][index]).tolist() == ids.tolist()
            got = np.asarray(answer["logprobs"][index])
            worst = max(worst, float(np.abs(got - logprobs).max()))
            # TRL reads the actual token's logprob from the entry (-inf only where it is missing).
            got_actual = np.asarray(answer["actual_logprobs"][index])[:, 0]
            worst = max(worst, float(np.abs(got_actual - actual).max()))
            assert np.asarray(answer["actual_token_ids"][index])[:, 0].tolist() == tokens[score_from:].tolist()
            positions += len(tokens) - score_from
    print(f"\nTRL VLLMClient vs gRPC: {positions} positions, K={TOP_K}, largest difference {worst:.2e}")
    assert worst <= TOL


def test_server_distillation_trainer_learns_from_our_http_port(server, tmp_path):
    """TRL's ServerDistillationTrainer (reverse KL on its own rollouts, the teacher's logprobs over
    HTTP) trains a student of the teacher's tokenizer on CPU: its loss falls."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

    student = build_tiny_model(tmp_path / "student", seed=1)
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"w{i}" for i in rng.integers(0, 90, size=6)) for _ in range(64)]
    args = ServerDistillationConfig(
        output_dir=str(tmp_path / "out"),
        teacher_model_server_url=f"http://trainer:{KEY}@127.0.0.1:{server.server.http_port}",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=8,
        max_steps=STEPS,
        max_completion_length=12,
        learning_rate=3e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    trainer = ServerDistillationTrainer(
        model=str(student),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=AutoTokenizer.from_pretrained(student),
    )
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    print(f"\nTRL ServerDistillationTrainer, {len(losses)} steps against our HTTP port: loss {first:.3f} -> {last:.3f}")
    assert len(losses) == STEPS and last < 0.7 * first
