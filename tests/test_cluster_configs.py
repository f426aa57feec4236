"""Static checks of cluster_configs/*.yaml: the Ray cluster launcher config and the KubeRay
RayCluster / RayJob manifests. No Ray import, no cluster, no network."""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "cluster_configs"
YAML_FILES = sorted(CONFIG_DIR.glob("*.yaml"))
RAY_VERSION = importlib.metadata.version("ray")
SECRET_NAME = "raysseg-credentials"
WORKING_DIR_VAR = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"

# rayproject/ray:<x.y.z>[-py3NN][-cpu|-gpu|-cuNNN]
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)(?:-py3\d+)?(?:-(?:cpu|gpu|cu\d+))?$")
GPU_INSTANCE = re.compile(r"^(g|p)\d+[a-z]*\.")
SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"aws_secret_access_key\s*[:=]\s*\S{20,}", re.IGNORECASE),
]


# ----------------------------------------------------------------------------- loading


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kind_of(doc: dict) -> str:
    if doc.get("apiVersion", "").startswith("ray.io/"):
        return doc.get("kind", "?")
    if "provider" in doc and "available_node_types" in doc:
        return "launcher"
    return "unknown"


def documents_of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(path, doc) for path in YAML_FILES for doc in load_documents(path) if kind_of(doc) == kind]


def doc_params(kind: str):
    return [pytest.param(doc, id=path.name) for path, doc in documents_of_kind(kind)]


# ----------------------------------------------------------------------------- helpers


def walk_images(node: Any) -> Iterator[str]:
    """Every value of an `image`, `head_image` or `worker_image` key, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("image", "head_image", "worker_image") and isinstance(value, str):
                yield value
            else:
                yield from walk_images(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_images(item)


def image_problem(image: str) -> str | None:
    """Why `image` is not an official Ray image of the installed version, or None."""
    if "ray-ml" in image:
        return f"{image}: the ray-ml images are no longer published"
    match = RAY_IMAGE.match(image)
    if not match:
        return f"{image}: not a rayproject/ray:<version>[-pyNNN][-gpu] tag"
    if match["version"] != RAY_VERSION:
        return f"{image}: Ray {match['version']} but ray=={RAY_VERSION} is installed"
    return None


def secret_matches(text: str) -> list[str]:
    return [m.group(0) for pattern in SECRET_PATTERNS for m in pattern.finditer(text)]


def lock_pins() -> dict[str, str]:
    lock = Path(__file__).resolve().parents[1] / "requirements.lock"
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower()] = version
    return pins


def pip_pins(commands: list[str]) -> dict[str, str]:
    """name -> version of every `name==version` in `pip install` commands."""
    pins = {}
    for command in commands:
        if "pip install" in command:
            for name, version in re.findall(r"([A-Za-z0-9_.\-]+)==([^\s\"']+)", command):
                pins[name.lower()] = version
    return pins


def pod_containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def cluster_containers(spec: dict) -> list[dict]:
    containers = list(pod_containers(spec["headGroupSpec"]["template"]))
    for group in spec["workerGroupSpecs"]:
        containers += pod_containers(group["template"])
    return containers


def gpu_count(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def uses_credentials_secret(container: dict) -> bool:
    return any(src.get("secretRef", {}).get("name") == SECRET_NAME for src in container.get("envFrom", []))


def check_ray_cluster_spec(spec: dict) -> None:
    """The head/worker layout shared by the RayCluster and the RayJob's rayClusterSpec."""
    assert spec["rayVersion"] == RAY_VERSION
    assert spec.get("enableInTreeAutoscaling") is True

    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert params.get("dashboard-host") == "0.0.0.0"
    assert params.get("num-cpus") == "0", "training must not run on the head"
    head_container = pod_containers(head["template"])[0]
    assert image_problem(head_container["image"]) is None, image_problem(head_container["image"])
    ports = {p["containerPort"] for p in head_container.get("ports", [])}
    assert {6379, 8265, 10001} <= ports

    groups = spec["workerGroupSpecs"]
    assert groups, "no worker group"
    for group in groups + [head]:
        # KubeRay passes rayStartParams to `ray start` and wants string values.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]

    gpu_groups = [g for g in groups if any(gpu_count(c) >= 1 for c in pod_containers(g["template"]))]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in gpu_groups:
        pod = group["template"]["spec"]
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), group["groupName"]
        shm_volumes = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        mounts = {m["name"] for c in pod_containers(group["template"]) for m in c.get("volumeMounts", [])
                  if m["mountPath"] == "/dev/shm"}
        assert mounts & shm_volumes, f"{group['groupName']}: no Memory emptyDir on /dev/shm"
        for container in pod_containers(group["template"]):
            assert "gpu" in container["image"], container["image"]

    for container in cluster_containers(spec):
        assert uses_credentials_secret(container), f"{container['name']}: no envFrom secretRef {SECRET_NAME}"
        assert not container.get("env") or all("value" not in e for e in container["env"]
                                                if re.search("SECRET|KEY|TOKEN|PASSWORD", e["name"])), container["env"]


# ----------------------------------------------------------------------------- all files


def test_the_three_kinds_are_present():
    kinds = sorted(kind_of(doc) for path in YAML_FILES for doc in load_documents(path))
    assert kinds == ["RayCluster", "RayJob", "launcher"]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_image_is_an_official_ray_image_of_the_installed_version(path):
    images = [image for doc in load_documents(path) for image in walk_images(doc)]
    assert images, f"{path.name} names no image"
    problems = [p for p in map(image_problem, images) if p]
    assert not problems, problems


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.iterdir()), ids=lambda p: p.name)
def test_no_credentials_in_files(path):
    assert not secret_matches(path.read_text()), f"{path.name} contains what looks like an AWS secret"


def test_secret_detector_and_image_checker_catch_bad_input():
    assert secret_matches("key: AKIA" + "Q" * 16)
    assert secret_matches("aws_secret_access_key = " + "x" * 40)
    assert not secret_matches("--from-literal=AWS_SECRET_ACCESS_KEY=... \\")
    assert image_problem(f"rayproject/ray-ml:{RAY_VERSION}-gpu")
    assert image_problem("rayproject/ray:2.9.0-py311-gpu" if RAY_VERSION != "2.9.0" else "rayproject/ray:1.0.0")
    assert image_problem(f"nvcr.io/nvidia/pytorch:{RAY_VERSION}")
    assert image_problem(f"rayproject/ray:{RAY_VERSION}-py311-gpu") is None


# ----------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("cfg", doc_params("launcher"))
def test_launcher_matches_ray_schema(cfg):
    jsonschema = pytest.importorskip("jsonschema")
    schema_file = importlib.metadata.distribution("ray").locate_file("ray/autoscaler/ray-schema.json")
    jsonschema.validate(cfg, json.loads(Path(schema_file).read_text()))


@pytest.mark.parametrize("cfg", doc_params("launcher"))
def test_launcher_nodes(cfg):
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] == "aws"
    assert cfg["auth"]["ssh_user"] == "ubuntu"
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("CPU") == 0, "training must not run on the head"
    workers = {name: t for name, t in types.items() if name != head}
    gpu_workers = [t for t in workers.values()
                   if t["resources"].get("GPU", 0) >= 1 or GPU_INSTANCE.match(t["node_config"]["InstanceType"])]
    assert gpu_workers, "no GPU worker type"
    assert all(t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"] for t in gpu_workers)
    assert max(t["max_workers"] for t in gpu_workers) >= 1
    for t in types.values():
        assert t["node_config"]["ImageId"].startswith("ami-")


@pytest.mark.parametrize("cfg", doc_params("launcher"))
def test_launcher_docker(cfg):
    docker = cfg["docker"]
    image = docker["image"]
    assert image.startswith("rayproject/ray:") and "gpu" in image and "ray-ml" not in image, image
    assert image_problem(image) is None, image_problem(image)
    options = " ".join(docker["run_options"])
    assert "--ulimit nofile=65536:65536" in options
    assert "--shm-size" in options


@pytest.mark.parametrize("cfg", doc_params("launcher"))
def test_launcher_commands(cfg):
    assert any("ray start --head" in c and "--autoscaling-config=~/ray_bootstrap_config.yaml" in c
               for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    setup = cfg.get("setup_commands", []) + cfg.get("head_setup_commands", []) + cfg.get("worker_setup_commands", [])
    # The code travels with each job (working_dir + runtime_env pip), and the image's torch is not replaced.
    for command in setup:
        assert not re.search(r"pip install\b.*(\s\.(\s|$)|\s-e\s|raysseg)", command), command
        assert not re.search(r"\btorch(vision)?\b", command), command
    pins = pip_pins(setup)
    locked = lock_pins()
    wrong = {name: (version, locked.get(name)) for name, version in pins.items() if locked.get(name) != version}
    assert not wrong, f"setup_commands pins differ from requirements.lock: {wrong}"


# ----------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("doc", doc_params("RayCluster"))
def test_raycluster(doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"])


@pytest.mark.parametrize("doc", doc_params("RayJob"))
def test_rayjob(doc):
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("raysseg ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0
    assert spec["submissionMode"] == "K8sJobMode"
    check_ray_cluster_spec(spec["rayClusterSpec"])


@pytest.mark.parametrize("doc", doc_params("RayJob"))
def test_rayjob_runtime_env(doc):
    spec = doc["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert re.match(r"^[a-z0-9]+://.+\.zip$", runtime_env["working_dir"]), runtime_env["working_dir"]
    # Ray runs pip in an empty scratch directory: "." is not the working directory; the lock's pins constrain it.
    assert runtime_env["pip"] == [f"-c {WORKING_DIR_VAR}/requirements.lock", WORKING_DIR_VAR]
    # KubeRay's submitter passes the runtime env through `bash -c` inside double quotes; the
    # variable set to its own name keeps the placeholder from being expanded to "".
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert "command" not in submitter
    assert {"name": "RAY_RUNTIME_ENV_CREATE_WORKING_DIR", "value": WORKING_DIR_VAR} in submitter.get("env", [])


def test_rayjob_cluster_matches_raycluster():
    """The RayJob duplicates the RayCluster's spec (anchors cannot span files): keep them equal."""
    (_, cluster), = documents_of_kind("RayCluster")
    (_, job), = documents_of_kind("RayJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
