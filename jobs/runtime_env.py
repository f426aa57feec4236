"""Print the runtime environment (JSON) that jobs/submit.sh gives `ray job submit`.

The job's virtualenv holds every pinned line of requirements.lock, then this repository as uploaded
(Ray substitutes the unpacked working directory for the placeholder; a literal "." would be resolved
in an empty scratch folder). Ray keeps one environment per pip spec, found again by the spec's text:
the last entry, a comment pip skips, carries the package's version and a hash of pyproject.toml and
requirements.lock, so a version bump or a new lock builds a new environment and an unchanged
repository reuses the cached one. RAYSSEG_PREINSTALLED=1 says the cluster's image already has raysseg:
no pip at all.

Endpoint, region and MLflow settings are forwarded from this shell. Credentials are not: a runtime
env is shown in the Ray dashboard and written to Ray's logs, so the nodes must have their own (an
instance profile, a Kubernetes secret, or the environment of `ray start`; see cluster_configs/README.md).
"""
import hashlib
import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORWARDED = ("AWS_ENDPOINT_URL", "AWS_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "HF_HUB_OFFLINE")
WORKING_DIR = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"


def pip_packages(root: Path = ROOT) -> list[str]:
    """The lock's requirements (raysseg itself comes from the working directory), the working directory,
    and the comment that names this version of pyproject.toml and requirements.lock."""
    pyproject, lock = (root / "pyproject.toml").read_bytes(), (root / "requirements.lock").read_bytes()
    pins = [line.strip() for line in lock.decode().splitlines()
            if line.strip() and not line.lstrip().startswith("#") and not re.match(r"raysseg\b", line.strip())]
    version = re.search(rb'^version\s*=\s*"([^"]+)"', pyproject, re.M)
    digest = hashlib.sha256(pyproject + b"\0" + lock).hexdigest()[:16]
    tag = f"# raysseg {version.group(1).decode() if version else '?'}, pyproject.toml + requirements.lock {digest}"
    return [*pins, WORKING_DIR, tag]


# `ray job stop` sends SIGTERM, then SIGKILL after this many seconds (Ray's default: 3). A stopped sweep
# marks its running trials KILLED in MLflow and removes its placement groups first (runtime/sweep.py).
STOP_GRACE_S = "30"


def runtime_env(environ=os.environ, root: Path = ROOT) -> dict:
    env = {"env_vars": {**{k: environ[k] for k in FORWARDED if k in environ},
                        "RAY_JOB_STOP_WAIT_TIME_S": STOP_GRACE_S}}
    if environ.get("RAYSSEG_PREINSTALLED") != "1":
        env["pip"] = pip_packages(root)
    return env


if __name__ == "__main__":
    print(json.dumps(runtime_env()))
