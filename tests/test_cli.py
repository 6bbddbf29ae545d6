"""The command lines take their defaults from the config dataclasses and reach every key."""

from __future__ import annotations

import dataclasses

import pytest

from student_trainer import cli as train_cli
from student_trainer.config import TrainConfig, load_config
from teacher_server import cli as teacher_cli
from teacher_server.engines import EngineConfig
from teacher_server.server import ServerConfig
from teacher_server.teacher_specs import TeacherSpec


def test_teacher_flags_default_to_the_server_config():
    args = teacher_cli._parser().parse_args(["serve", "--model", "m"])
    assert teacher_cli.server_config(args) == ServerConfig(engine_config=EngineConfig(model="m"))


def test_teachers_by_flag_and_by_yaml_file_give_the_same_specs(tmp_path):
    flags = ["serve", "--teacher", "m=/models/m", "--teacher", "base=/models/b+c", "--teacher", "x=base+/ad/x"]
    config = teacher_cli.server_config(teacher_cli._parser().parse_args(flags + ["--default-teacher", "x"]))
    assert config.teachers == (
        TeacherSpec(name="m", model="/models/m"),
        TeacherSpec(name="base", model="/models/b+c"),  # '+' in a path whose first part names no teacher
        TeacherSpec(name="x", base="base", adapter="/ad/x"),
    )
    assert config.default_teacher == "x" and config.engine_config.model == ""
    listed = tmp_path / "teachers.yaml"
    listed.write_text(
        "default: x\nteachers:\n  - {name: m, model: /models/m, dtype: bfloat16}\n"
        "  - {name: base, model: /models/b+c}\n  - {name: x, base: base, adapter: /ad/x}\n"
    )
    from_file = teacher_cli.server_config(teacher_cli._parser().parse_args(["serve", "--teachers", str(listed)]))
    assert from_file.teachers == config.teachers and from_file.default_teacher == "x"
    assert from_file.teachers[0].engine_options == {"dtype": "bfloat16"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--teacher", "x=base+/ad/x"], "base teacher 'base' is not one of the teachers given"),
        (["--teacher", "a=/m", "--teacher", "a=/n"], "'a' is given twice"),
        (["--teacher", "a b=/m"], "teacher name 'a b'"),
        (["--teacher", "a=/m", "--default-teacher", "b"], "default teacher 'b' is not one of a"),
        (["--model", "/m", "--default-teacher", "b"], "--default-teacher names one of"),
        (["--model", "/m", "--engine", "vllm", "--dtype", "float64"], "is the hf engine's, not vllm's"),
    ],
)
def test_teacher_lists_that_cannot_be_served_exit_with_a_message(flags, message):
    with pytest.raises(SystemExit) as exited:
        teacher_cli.main(["serve", *flags])
    assert message in str(exited.value)


def test_every_train_config_key_has_a_flag_and_no_flag_changes_a_default():
    parser = train_cli._parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    missing = [key.name for key in dataclasses.fields(TrainConfig) if "--" + key.name.replace("_", "-") not in flags]
    assert missing == []
    args = vars(parser.parse_args(["--student", "s", "--prompts", "p"]))
    args.pop("config"), args.pop("resume"), args.pop("log_level")
    assert load_config(None, **args) == TrainConfig(student="s", prompts="p")


def test_teacher_endpoints_are_name_target_pairs():
    flags = ["--student", "s", "--prompts", "p", "--teacher-endpoint", "math=10.0.0.2:50051"]
    config, _ = train_cli.parse([*flags, "--teacher-endpoint", "code=dns:///code-teacher:50051"])
    assert config.teacher_endpoints == {"math": "10.0.0.2:50051", "code": "dns:///code-teacher:50051"}
    with pytest.raises(SystemExit):  # argparse: expected NAME=HOST:PORT
        train_cli.parse([*flags, "--teacher-endpoint", "math"])


def test_flags_the_parser_builds_from_the_config_parse_into_it():
    args = vars(
        train_cli._parser().parse_args(
            [
                "--student",
                "s",
                "--prompts",
                "p",
                "--no-mask-special-tokens",
                "--weight-decay",
                "0.1",
                "--lr-schedule",
                "cosine",
                "--keep-checkpoints",
                "5",
                "--teacher-timeout-s",
                "9.5",
            ]
        )
    )
    args.pop("config"), args.pop("resume"), args.pop("log_level")
    config = load_config(None, **args)
    assert (config.mask_special_tokens, config.weight_decay, config.lr_schedule) == (False, 0.1, "cosine")
    assert (config.keep_checkpoints, config.teacher_timeout_s) == (5, 9.5)


def test_a_float64_teacher_in_a_teachers_file_needs_the_hf_engine(tmp_path):
    teachers = tmp_path / "teachers.yaml"
    teachers.write_text("teachers:\n  - {name: a, model: /m, dtype: float64}\n")
    with pytest.raises(SystemExit) as exited:
        teacher_cli.main(["serve", "--teachers", str(teachers), "--engine", "vllm"])
    assert "is the hf engine's, not vllm's" in str(exited.value)
