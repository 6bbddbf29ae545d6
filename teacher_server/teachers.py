"""The teachers one server hosts: loaded once at start-up (a base model once, its LoRA adapters
over it), and found by name (OpenSession) or by session (Score).

Teachers that share a tokenizer share their sessions' registry, so a student tokenizer is read
and aligned once for a base and all its adapters; session ids name their teacher, so the same
student opens a different session with each teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from teacher_server.engines import ADAPTER_ENGINES, Engine, EngineConfig, load_engine
from teacher_server.engines.adapters import AdapterError, AdapterTeacher, check_adapter_dir, engine_args_for_adapters
from teacher_server.errors import FailedPrecondition, NotFound
from teacher_server.identity import TeacherIdentity, weights_sha256
from teacher_server.service import TeacherService
from teacher_server.sessions import TeacherVocabulary
from teacher_server.teacher_specs import TeacherSpec

log = logging.getLogger(__name__)


@dataclass
class LoadedTeacher:
    spec: TeacherSpec
    engine: Engine
    vocabulary: TeacherVocabulary
    weights_sha256: str
    memory_bytes: int  # what loading it added to the process's resident memory

    @property
    def name(self) -> str:
        return self.spec.name


def load_teachers(specs: tuple[TeacherSpec, ...], engine_name: str, config: EngineConfig) -> list[LoadedTeacher]:
    """Load every full-model teacher, then every adapter over its base; in the order given."""
    adapters = {spec.name: [a.adapter for a in specs if a.base == spec.name] for spec in specs}
    loaded: dict[str, LoadedTeacher] = {}
    for spec in specs:
        if not spec.is_adapter:
            loaded[spec.name] = _load_model(spec, engine_name, config, adapters[spec.name])
    for spec in specs:
        if spec.is_adapter:
            loaded[spec.name] = _load_adapter(spec, loaded[spec.base])
    for name, directories in adapters.items():  # the base, too, must say which adapter is in force: none
        if directories:
            base = loaded[name]
            base.engine = AdapterTeacher(base.engine, None, base.engine.model_name)
    return [loaded[spec.name] for spec in specs]


def _load_model(spec: TeacherSpec, engine_name: str, defaults: EngineConfig, adapters: list[str]) -> LoadedTeacher:
    config = dataclasses.replace(defaults, model=spec.model, **spec.engine_options)
    if adapters:
        if engine_name not in ADAPTER_ENGINES:
            raise AdapterError(
                f"teacher {spec.name!r} has LoRA adapters, which the {engine_name} engine does not host here; "
                f"serve it with --engine {' or '.join(ADAPTER_ENGINES)}"
            )
        configs = [check_adapter_dir(spec.name, path) for path in adapters]
        engine_args = {**config.engine_args, **engine_args_for_adapters(engine_name, configs)}
        config = dataclasses.replace(config, engine_args=engine_args)
    before = resident_bytes()
    with ThreadPoolExecutor(1) as hashing:  # the hash streams the model's files while the engine loads them
        sha = hashing.submit(weights_sha256, spec.model)
        engine = load_engine(engine_name, config)
    vocabulary = TeacherVocabulary.from_pretrained(spec.tokenizer or spec.model, engine.vocab_size)
    memory = resident_bytes() - before
    log.info("teacher %r: %s", spec.name, vocabulary.describe_head())
    log.info("teacher %r: %s with the %s engine; +%.0f MiB", spec.name, spec.model, engine.name, memory / 2**20)
    return LoadedTeacher(spec, engine, vocabulary, sha.result(), memory)


def _load_adapter(spec: TeacherSpec, base: LoadedTeacher) -> LoadedTeacher:
    before = resident_bytes()
    weights = base.engine.load_adapter(spec.name, spec.adapter, spec.base)
    engine = AdapterTeacher(base.engine, spec.name, f"{base.engine.model_name}+{spec.adapter}")
    memory = resident_bytes() - before
    log.info(
        "teacher %r: LoRA adapter %s over %r, %.1f MiB of adapter weights; +%.0f MiB",
        spec.name,
        spec.adapter,
        spec.base,
        weights / 2**20,
        memory / 2**20,
    )
    sha = hashlib.sha256(f"{base.weights_sha256}+{weights_sha256(spec.adapter)}".encode()).hexdigest()
    return LoadedTeacher(spec, engine, base.vocabulary, sha, memory)


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class Teachers:
    """The hosted teachers' services by name, and which one holds a session."""

    def __init__(self, services: list[TeacherService], default: str) -> None:
        self.by_name = {service.name: service for service in services}
        self.default = default

    def named(self, name: str) -> TeacherService:
        """The teacher `name` ("": the default one); NOT_FOUND lists the names."""
        service = self.by_name.get(name or self.default)
        if service is None:
            raise NotFound(
                f"this server hosts no teacher {name!r}; its teachers are {', '.join(self.by_name)} (GetInfo.teachers)"
            )
        return service

    def holding(self, session_id: str) -> TeacherService:
        """The teacher a session was opened with; the default one for an unknown id (which then
        answers NOT_FOUND, or a tenant's own error, as it always did)."""
        for service in self.by_name.values():
            if service.holds(session_id):
                return service
        return self.by_name[self.default]

    def identities(self) -> tuple[TeacherIdentity, ...]:
        return tuple(TeacherIdentity(s.engine.model_name, s.weights_sha256) for s in self.by_name.values())

    def check_pin(self, service: TeacherService, pinned: TeacherIdentity | None) -> None:
        """A client pinned to one teacher may not use another of this server."""
        if pinned is not None and pinned != TeacherIdentity(service.engine.model_name, service.weights_sha256):
            raise FailedPrecondition(
                f"the client pinned {pinned.pin!r}, but teacher {service.name!r} is "
                f"{service.engine.model_name}@{service.weights_sha256}: re-pin to use another teacher"
            )

    def shutdown(self) -> None:
        registries = {id(service.sessions): service for service in self.by_name.values()}
        for service in registries.values():
            service.shutdown()
