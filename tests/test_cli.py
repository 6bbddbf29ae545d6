"""The command lines take their defaults from the config dataclasses and reach every key."""

from __future__ import annotations

import dataclasses

from student_trainer import cli as train_cli
from student_trainer.config import TrainConfig, load_config
from teacher_server import cli as teacher_cli
from teacher_server.engines import EngineConfig
from teacher_server.server import ServerConfig


def test_teacher_flags_default_to_the_server_config():
    args = teacher_cli._parser().parse_args(["serve", "--model", "m"])
    assert teacher_cli.server_config(args) == ServerConfig(engine_config=EngineConfig(model="m"))


def test_every_train_config_key_has_a_flag_and_no_flag_changes_a_default():
    parser = train_cli._parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    missing = [key.name for key in dataclasses.fields(TrainConfig) if "--" + key.name.replace("_", "-") not in flags]
    assert missing == []
    args = vars(parser.parse_args(["--student", "s", "--prompts", "p"]))
    args.pop("config"), args.pop("resume"), args.pop("log_level")
    assert load_config(None, **args) == TrainConfig(student="s", prompts="p")


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
