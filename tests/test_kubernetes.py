"""Static checks of the Kubernetes example in deploy/kubernetes/ (no cluster needed).

* every manifest validates, strictly (unknown fields are errors), against the
  Kubernetes OpenAPI schemas shipped in the `kubernetes-validate` package;
* the pieces agree: the headless Service selects the teacher pods and targets the
  gRPC port the server listens on, probes use that port's health service, the
  grace period outlasts the drain, trainers reach the Service by its DNS name with
  round robin, each with its own key;
* the arguments are accepted by the real `opd-teacher serve` and `opd-train` parsers
  (and so are the compose file's).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from student_trainer.cli import _parser as trainer_parser
from teacher_server.cli import _parser as teacher_parser
from teacher_server.teacher_specs import load_teachers_file

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.30.0"  # native gRPC probes are GA since 1.27


def documents() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in documents() if doc["kind"] == kind]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_manifests_exist():
    assert [path.name for path in MANIFESTS] == ["teacher.yaml", "trainers.yaml"]


@pytest.mark.parametrize("doc", documents(), ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}")
def test_manifest_is_valid_kubernetes(doc):
    validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")
    validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_catches_mistakes():
    validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")
    (deployment,) = by_kind("Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(validate.ValidationError):
        validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "two"
    with pytest.raises(validate.ValidationError):
        validate.validate(broken, KUBERNETES_VERSION, strict=True)


def teacher_container() -> tuple[dict, dict]:
    (deployment,) = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_teacher_deployment_and_headless_service_agree():
    (deployment,) = by_kind("Deployment")
    (service,) = by_kind("Service")
    pod, container = teacher_container()
    args = container["args"]
    teacher_parser().parse_args(["serve", *args])  # every flag exists

    assert deployment["spec"]["replicas"] >= 2
    assert service["spec"]["clusterIP"] == "None", "headless: DNS must return every pod for round robin"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["metadata"]["namespace"] == deployment["metadata"]["namespace"]

    port = int(flag(args, "--port"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == port
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "grpc" and service_port["port"] == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe  # the open grpc.health.v1 service
    assert ports["metrics"] == int(flag(args, "--metrics-port"))
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])

    # The drain (--grace) ends before Kubernetes gives up and kills.
    assert pod["terminationGracePeriodSeconds"] > float(flag(args, "--grace"))
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    # The key file comes from a Secret volume, read-only.
    keys = Path(flag(args, "--api-keys"))
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for path, m in mounts.items() if keys.is_relative_to(path))
    assert mount["readOnly"] and "secret" in volumes[mount["name"]]
    assert pod["securityContext"]["runAsNonRoot"] and container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_teachers_of_the_config_map_can_be_served_and_are_mounted_where_the_flag_says(tmp_path):
    (config_map,) = by_kind("ConfigMap")
    pod, container = teacher_container()
    path = Path(flag(container["args"], "--teachers"))
    listed = tmp_path / path.name
    listed.write_text(config_map["data"][path.name])
    specs, default = load_teachers_file(str(listed))  # refuses a list it cannot serve
    assert default in {spec.name for spec in specs} and any(spec.is_adapter for spec in specs)
    mount = next(m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"] and mount["readOnly"]
    models = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "models")
    assert all(Path(spec.model or spec.adapter).is_relative_to(models) for spec in specs)


def test_trainers_reach_every_replica_with_their_own_key():
    (service,) = by_kind("Service")
    jobs = by_kind("Job")
    assert len(jobs) == 2
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    port = service["spec"]["ports"][0]["port"]
    secrets, outputs = set(), set()
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        config = vars(trainer_parser().parse_args(args))
        assert config["teacher"] == f"dns:///{name}.{namespace}.svc.cluster.local:{port}"
        assert config["resume"], "a restarted pod must continue from its checkpoint"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        key = Path(config["teacher_api_key_file"])
        mount = next(m for path, m in mounts.items() if key.is_relative_to(path))
        secrets.add(volumes[mount["name"]]["secret"]["secretName"])
        output = mounts[config["output"]]
        outputs.add(volumes[output["name"]]["persistentVolumeClaim"]["claimName"])
        assert job["metadata"]["namespace"] == namespace
    assert len(secrets) == 2 and len(outputs) == 2, "each trainer is its own tenant with its own output"


def test_compose_commands_parse():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        if name.startswith("teacher"):
            teacher_parser().parse_args(["serve", *service["command"]])
        else:
            trainer_parser().parse_args(service["command"])
