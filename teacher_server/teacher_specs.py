"""Which teachers a server hosts: `--model` (one teacher), repeated `--teacher NAME=PATH` and
`NAME=BASE+ADAPTER_DIR`, or a YAML file of teachers with per-teacher engine options.

Pure configuration: nothing here loads a model (teachers.py does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TEACHER = "default"  # the name of the one teacher of `--model`
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# What a YAML teacher may set beyond name, model, base, adapter and tokenizer (EngineConfig fields).
ENGINE_OPTIONS = ("device", "dtype", "chunk_size", "max_model_len", "gpu_memory_utilization", "engine_args")


class TeacherSpecError(ValueError):
    """A teacher list that cannot be served (the message says which entry and why)."""


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    model: str = ""  # a model directory or hub id ("" for an adapter)
    base: str = ""  # an adapter's base teacher (its name)
    adapter: str = ""  # a PEFT LoRA adapter directory
    tokenizer: str | None = None  # default: the model's (an adapter: its base's)
    engine_options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def is_adapter(self) -> bool:
        return bool(self.adapter)


def parse_teacher_flag(value: str) -> tuple[str, str]:
    """`NAME=PATH` or `NAME=BASE+ADAPTER_DIR` -> (name, rest); resolved by resolve_teachers."""
    name, sep, rest = value.partition("=")
    if not sep or not rest:
        raise TeacherSpecError(f"--teacher {value!r}: expected NAME=MODEL_PATH or NAME=BASE_NAME+ADAPTER_DIR")
    return name, rest


def resolve_teachers(flags: list[tuple[str, str]]) -> tuple[TeacherSpec, ...]:
    """Specs of `--teacher` flags: a value `BASE+DIR` whose BASE names another teacher is an adapter."""
    names = {name for name, _ in flags}
    specs = []
    for name, rest in flags:
        base, plus, adapter = rest.partition("+")
        if plus and base in names:
            specs.append(TeacherSpec(name=name, base=base, adapter=adapter))
        elif plus and NAME_PATTERN.fullmatch(base) and not Path(rest).exists():
            raise TeacherSpecError(
                f"--teacher {name}={rest}: the base teacher {base!r} is not one of the teachers given "
                f"({', '.join(sorted(names))}); name it with its own --teacher {base}=MODEL_PATH"
            )
        else:
            specs.append(TeacherSpec(name=name, model=rest))
    return validated(tuple(specs))


def load_teachers_file(path: str) -> tuple[tuple[TeacherSpec, ...], str]:
    """(teachers, default name) of a YAML file:

    default: math            # optional; the first teacher otherwise
    teachers:
      - {name: math, model: /models/math, dtype: bfloat16}
      - {name: code, base: math, adapter: /adapters/code}
    """
    import yaml

    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise TeacherSpecError(f"{path}: {error}") from None
    entries = document.get("teachers") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise TeacherSpecError(f"{path}: expected a mapping with a non-empty list 'teachers'")
    specs = tuple(_spec_of(entry, f"{path}, teachers[{index}]") for index, entry in enumerate(entries))
    default = document.get("default", specs[0].name)
    return validated(specs, default), default


def _spec_of(entry: object, where: str) -> TeacherSpec:
    known = {"name", "model", "base", "adapter", "tokenizer", *ENGINE_OPTIONS}
    if not isinstance(entry, dict) or "name" not in entry:
        raise TeacherSpecError(f"{where}: expected a mapping with a 'name'")
    unknown = sorted(set(entry) - known)
    if unknown:
        raise TeacherSpecError(f"{where}: unknown keys {unknown}; a teacher may set {sorted(known)}")
    return TeacherSpec(
        name=str(entry["name"]),
        model=str(entry.get("model", "")),
        base=str(entry.get("base", "")),
        adapter=str(entry.get("adapter", "")),
        tokenizer=entry.get("tokenizer"),
        engine_options={key: entry[key] for key in ENGINE_OPTIONS if key in entry},
    )


def validated(specs: tuple[TeacherSpec, ...], default: str | None = None) -> tuple[TeacherSpec, ...]:
    """The specs, if they can be served together: unique valid names, each either a model or an
    adapter whose base is a full-model teacher of the list."""
    names = [spec.name for spec in specs]
    by_name = {spec.name: spec for spec in specs}
    for spec in specs:
        if not NAME_PATTERN.fullmatch(spec.name):
            raise TeacherSpecError(
                f"teacher name {spec.name!r}: use letters, digits, '_', '.' and '-' (at most 64, not first)"
            )
        if names.count(spec.name) > 1:
            raise TeacherSpecError(f"teacher name {spec.name!r} is given twice")
        if bool(spec.model) == bool(spec.adapter):
            raise TeacherSpecError(f"teacher {spec.name!r}: give either a model or a base and an adapter")
        if spec.adapter:
            base = by_name.get(spec.base)
            if base is None or base.is_adapter:
                raise TeacherSpecError(
                    f"teacher {spec.name!r}: its base {spec.base!r} is not a full-model teacher of this server "
                    f"(teachers: {', '.join(names)})"
                )
    if default is not None:
        check_default(specs, default)
    return specs


def check_default(specs: tuple[TeacherSpec, ...], default: str) -> None:
    if default not in {spec.name for spec in specs}:
        raise TeacherSpecError(f"the default teacher {default!r} is not one of {', '.join(s.name for s in specs)}")
