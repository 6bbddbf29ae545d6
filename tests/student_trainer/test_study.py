"""opd-study: the --quick pipeline end to end (outputs, not claims), and its numbers on synthetic records."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from student_trainer import study
from student_trainer.config import TrainConfig
from student_trainer.demo import task
from student_trainer.study_report import aggregate, claims, compare, markdown_table, summarize_run

PNG = b"\x89PNG\r\n\x1a\n"


def untrained(path: Path, seed: int, tokenizer: str = "demo") -> Path:
    """A random model of the demo's task: the quick study only checks the plumbing, so the test
    pays neither for the real demo teacher (40-80 s on first use) nor for any training."""
    built = task.TOKENIZERS[tokenizer]()
    config = task.student_config(len(built), built if tokenizer != "demo" else None)
    task.build_model(config, seed).save_pretrained(path)
    built.save_pretrained(path)
    return path


@pytest.fixture
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # main() sets it for the trainer


def test_quick_study_writes_runs_summary_table_and_plots(tmp_path: Path, _restore_threads, monkeypatch) -> None:
    teacher, student = untrained(tmp_path / "teacher", seed=0), untrained(tmp_path / "student", seed=1)
    xtok_student = untrained(tmp_path / "xtok", seed=2, tokenizer="xtok")  # another tokenizer than the teacher's
    output = tmp_path / "study"
    study.main(
        [
            "--output",
            str(output),
            "--quick",
            "--teacher-model",
            str(teacher),
            "--student-model",
            str(student),
            "--xtok-student-model",
            str(xtok_student),
        ]
    )

    settings = study.QUICK
    summary = json.loads((output / "summary.json").read_text())
    assert list(summary["variants"]) == list(settings.variants) and "recipe_xtok" in settings.variants
    assert summary["students"] == {"demo": str(student), "xtok": str(xtok_student)}
    assert summary["teacher_max_k"] == len(task.VOCAB)  # K=32 asked, the 14-token vocabulary caps it
    for name, variant in summary["variants"].items():
        assert variant["top_k_sent"] == min(study.VARIANT_BY_NAME[name].top_k, len(task.VOCAB))
        assert [run["seed"] for run in variant["runs"]] == list(settings.seeds)
        for key in (
            "accuracy_final",
            "accuracy_doubled_digit_final",
            "accuracy_no_doubled_digit_final",
            "heldout_rkl_final",
            "heldout_masked_final",
            "heldout_support_mass_final",
            "grad_norm_mean",
            "grad_norm_var",
            "student_support_mass",
            "negative_advantage_share",
            "masked",
        ):
            stats = variant["aggregate"][key]
            assert stats["n"] == len(settings.seeds) and math.isfinite(stats["mean"]), (name, key)
        for seed in settings.seeds:
            run_dir = output / "runs" / name / f"seed{seed}"
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            assert [r["step"] for r in records] == list(range(settings.steps + 1))
            evaluated = [r["step"] for r in records if "accuracy" in r and "heldout_masked" in r]
            assert evaluated == list(range(0, settings.steps + 1, settings.eval_every))
            config = json.loads((run_dir / "run.json").read_text())["config"]
            assert config["loss"] == variant["loss"]
            assert config["student"] == summary["students"][variant["student"]]
    verdicts = {c["claim"]: c["verdict"] for c in summary["claims"]}
    assert len(verdicts) == 10 and set(verdicts.values()) <= {
        "held",
        "weakly held",
        "not held",
        "not evaluated",
        "not tested",
    }

    table = (output / "summary.md").read_text()
    assert table.count("| `") == len(settings.variants) and "± " in table
    for name in ("curves.png", "bars.png"):
        data = (output / name).read_bytes()
        assert data[:8] == PNG and len(data) < 300_000, name

    # A finished run is reused (an interrupted study continues), even with the teacher on another port.
    run_dir = output / "runs" / "recipe" / "seed0"
    config = TrainConfig(**{**json.loads((run_dir / "run.json").read_text())["config"], "teacher": "127.0.0.1:1"})
    trained: list[TrainConfig] = []
    monkeypatch.setattr(study, "train", lambda config, **kwargs: trained.append(config))
    reused = study.run_one(config, evaluator=None, teacher_model=str(teacher))
    assert reused["metrics"] == summarize_run(study.read_records(run_dir))
    assert trained == []
    changed = dataclasses.replace(config, lr=2e-3)  # other settings: another run, trained
    study.run_one(changed, evaluator=None)
    assert trained == [changed]
    study.run_one(config, evaluator=None, teacher_model=str(student))  # another teacher: trained again
    assert trained == [changed, config]


def test_training_problems_without_doubled_digits() -> None:
    """--no-doubled-digit-prompts: 20k training problems, none with a doubled digit, in a prompts file of their own."""
    problems = study.training_problems(doubled_digits=False)
    assert len(problems) == 20_000 and not any(task.has_doubled_digit(p.answer) for p in problems)
    assert len({p.prompt for p in problems}) == len(problems)
    assert study.training_problems(doubled_digits=True) == task.make_problems(20_000, seed=7, split="train")
    output = Path("study")
    files = {
        study.prompts_file(output, dataclasses.replace(study.FULL, doubled_digit_prompts=d)) for d in (True, False)
    }
    assert len(files) == 2


def records_of(accuracies: list[float], grad_norms: list[float], eval_every: int = 2) -> list[dict]:
    """Synthetic metrics.jsonl lines: evaluations at 0, eval_every, ...; one training record per step."""
    records = [{"step": 0, "accuracy": accuracies[0], "heldout_rkl": 1.0}]
    for step, grad in enumerate(grad_norms, start=1):
        record = {
            "step": step,
            "grad_norm": grad,
            "student_support_mass": step / 10,
            "negative_advantage_share": 0.5,
            "masked": 0.1,
            "response_length": 7.0,
            "step_s": 0.2,
        }
        if step % eval_every == 0:
            record |= {"accuracy": accuracies[step // eval_every], "heldout_rkl": 1.0 / (step + 1)}
        records.append(record)
    return records


def test_summarize_run() -> None:
    summary = summarize_run(records_of([0.2, 0.6, 0.3, 0.5, 0.9], [1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0, 3.0]))
    assert summary["accuracy_start"] == 0.2 and summary["accuracy_final"] == 0.9 and summary["accuracy_best"] == 0.9
    assert summary["accuracy_drawdown"] == pytest.approx(0.3)  # 0.6 -> 0.3
    assert summary["grad_norm_mean"] == 2.0 and summary["grad_norm_var"] == 1.0 and summary["grad_norm_cv"] == 0.5
    assert summary["heldout_rkl_start"] == 1.0 and summary["heldout_rkl_final"] == pytest.approx(1 / 9)
    assert summary["student_support_mass"] == pytest.approx(0.75)  # the last quarter: steps 7 and 8
    assert summary["masked"] == pytest.approx(0.1) and summary["negative_advantage_share"] == 0.5
    assert summary["live_steps"] == 8 and summary["grad_norm_var_live"] == 1.0
    assert summarize_run(records_of([0.1, 0.2, 0.3], [1.0] * 4))["accuracy_drawdown"] == 0.0


def test_collapsed_steps_do_not_count_as_gradient_variance() -> None:
    records = records_of([0.2, 0.1, 0.0], [5.0, 7.0, 0.0, 0.0])
    for record in records[3:]:
        record["masked"] = 0.9  # the student emits masked special tokens: no loss, zero gradient
    summary = summarize_run(records)
    assert summary["grad_norm_var"] == 9.5 and summary["live_steps"] == 2
    assert summary["grad_norm_mean_live"] == 6.0 and summary["grad_norm_var_live"] == 1.0
    assert math.isnan(summarize_run(records[:1] + [dict(records[3], grad_norm=0.0)])["grad_norm_var_live"])


def test_aggregate_mean_and_spread_over_seeds() -> None:
    stats = aggregate([{"seed": 0, "x": 1.0}, {"seed": 1, "x": 2.0}, {"seed": 2, "x": 6.0}])
    assert set(stats) == {"x"}
    assert stats["x"] == {"mean": 3.0, "std": pytest.approx(math.sqrt(7.0)), "min": 1.0, "max": 6.0, "n": 3}
    assert aggregate([{"seed": 0, "x": 4.0}])["x"]["std"] == 0.0


def test_compare_verdicts() -> None:
    assert compare([0.9, 0.8], [0.5, 0.7]) == "held"
    assert compare([0.9, 0.6], [0.5, 0.7]) == "weakly held"
    assert compare([0.5, 0.6], [0.9, 0.7]) == "not held"
    assert compare([0.1, 0.2], [0.3, 0.4], higher_is_better=False) == "held"
    assert compare([0.5], [0.5]) == "not held"  # a tie is no evidence
    assert compare([math.nan, 1.0], [0.5, 0.6]) == "no data"


def variant(name: str, runs: list[dict]) -> dict:
    spec = study.VARIANT_BY_NAME[name]
    return {
        "loss": spec.loss,
        "top_k_sent": 14,
        "top_p": spec.top_p,
        "gamma": spec.gamma,
        "runs": runs,
        "aggregate": aggregate(runs),
    }


def run(final: float, drawdown: float = 0.0, grad_var: float = 1.0, start: float = 0.2) -> dict:
    return {
        "seed": 0,
        "accuracy_start": start,
        "accuracy_final": final,
        "accuracy_drawdown": drawdown,
        "heldout_rkl_final": 1.0,
        "heldout_masked_final": 0.0,
        "grad_norm_var": 0.0,
        "grad_norm_mean": 1.0,
        "grad_norm_cv": 1.0,
        "grad_norm_var_live": grad_var,
        "grad_norm_mean_live": 1.0,
        "live_steps": 10.0,
        "student_support_mass": 0.9,
        **{
            key: 0.0
            for key in (
                "accuracy_best",
                "accuracy_doubled_digit_final",
                "accuracy_no_doubled_digit_final",
                "negative_advantage_share",
                "masked",
            )
        },
    }


def test_claims_on_synthetic_variants() -> None:
    variants = {
        "sampled_g0": variant("sampled_g0", [run(0.5, 0.2, 1.0), run(0.6, 0.1, 1.2)]),
        "sampled_g0.5": variant("sampled_g0.5", [run(0.5, grad_var=2.0), run(0.5, grad_var=3.0)]),
        "sampled_g1": variant("sampled_g1", [run(0.4, grad_var=1.5), run(0.4, grad_var=1.1)]),
        "recipe": variant("recipe", [run(0.9), run(0.95)]),
        "recipe_no_renorm": variant("recipe_no_renorm", [run(0.0), run(0.3)]),
        "recipe_top_p1": variant("recipe_top_p1", [run(0.7), run(0.8)]),
    }
    verdicts = [c["verdict"] for c in claims(variants)]
    # better; more stable; collapses in one seed of two; top-p 1.0 beats the baseline; gamma 1 only on average;
    # no cross-tokenizer variants, no baseline without masking, no union supports
    assert verdicts == ["held", "held", "weakly held", "not held", "weakly held"] + ["not evaluated"] * 5
    assert "0.925 ± 0.035" in claims(variants)[0]["detail"]
    assert [c["verdict"] for c in claims({"recipe": variants["recipe"]})] == ["not evaluated"] * 10

    masked = {"recipe_xtok": variant("recipe_xtok", [run(0.8) | {"masked": 0.02}, run(0.7) | {"masked": 0.02}])}
    # Without the trainer's masking as many positions stay masked: the switch was inert, the runs are replicates.
    inert = [run(0.81) | {"masked": 0.02}, run(0.7) | {"masked": 0.015}]
    same = claims(masked | {"recipe_xtok_nomask": variant("recipe_xtok_nomask", inert)})[-5]
    assert same["verdict"] == "not tested" and same["detail"].startswith("without the trainer's masking 0.0175")
    unmasked = [run(0.5), run(0.6)]  # masked 0.0: the special positions carried a loss
    assert claims(masked | {"recipe_xtok_nomask": variant("recipe_xtok_nomask", unmasked)})[-5]["verdict"] == "held"
    # The baseline without masking: better than with it in every seed.
    baseline = {"sampled_g0_nomask": variant("sampled_g0_nomask", [run(0.7), run(0.8)])}
    assert claims(variants | baseline)[-4]["verdict"] == "held"
    # The union support: better than the teacher's top-4 alone in every seed.
    supports = {"topk_k4": variant("topk_k4", [run(0.2), run(0.25)])}
    supports["topk_k4_union"] = variant("topk_k4_union", [run(0.5), run(0.6)])
    assert claims(supports)[-3]["verdict"] == "held"
    # Across tokenizers: the union against the projected support alone, and its gain (final - start)
    # against the same-tokenizer recipe's (0.725 here): 0.775 is 1.07 of it, 0.55 is 0.76.
    union = variant("recipe_xtok_union", [run(0.9, start=0.1), run(0.85, start=0.1)])
    assert claims(masked | {"recipe_xtok_union": union})[-2]["verdict"] == "held"
    gain = claims(variants | {"recipe_xtok_union": union})[-1]
    assert gain["verdict"] == "held" and "1.07 of it" in gain["detail"]
    slower = variant("recipe_xtok_union", [run(0.7, start=0.1), run(0.6, start=0.1)])
    assert claims(variants | {"recipe_xtok_union": slower})[-1]["verdict"] == "not held"

    table = markdown_table(variants)
    assert table.count("\n") == 2 + len(variants) and "| `recipe` | 14 | 2 | 0.925 ± 0.035 |" in table
