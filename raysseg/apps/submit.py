"""``python -m raysseg.apps.submit --repo REPO -- COMMAND ...``: a raysseg command as a Ray job (jobs/submit.sh).

1. Paths. The job runs in Ray's temporary upload of the repository (``.../_ray_pkg_<hash>/``, without
   .gitignored files like data/), so every relative local path (the config's ``PATH_KEYS`` after its
   ``--set`` overrides, ``--config``/``--space`` files, ``--checkpoint``/``--split``/``--out``/``--images``/
   ``--probe-train``) becomes the absolute path here when every node of the cluster runs on this machine,
   and is refused with one line (exit 2) for a remote cluster. A missing ``MLFLOW_TRACKING_URI`` becomes
   ``mlruns.db`` in the submitting folder, or is refused for a remote cluster.
2. ``ray job submit --submission-id ID --working-dir REPO --runtime-env-json <jobs/runtime_env.py>``,
   following the job's logs.
3. The exit code is the job's own: ``ray job submit`` says 1 for any failure, so it is read from
   ``ray job status ID`` ("Job entrypoint command failed with exit code N, ...").
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from raysseg.settings import ConfigError

CONFIG_COMMANDS = ("train", "run", "pretrain", "sweep")
FILE_OPTIONS = {"config": "--config", "space": "--space"}  # YAML files the job reads (or built-in names)
PATH_OPTIONS = {  # command -> {argparse dest: option}: paths the job reads or writes
    "evaluate": {"checkpoint": "--checkpoint", "split": "--split", "out": "--out", "probe_train": "--probe-train"},
    "predict": {"checkpoint": "--checkpoint", "images": "--images", "out": "--out"},
    "concepts": {"checkpoint": "--checkpoint", "split": "--split", "out": "--out"},
    "run": {"out": "--out"},
}
LOOPBACK = ("localhost", "127.0.0.1", "::1", "0.0.0.0")
STOPPED_EXIT = 130  # what raysseg exits with when stopped (SIGTERM is Ctrl-C): a stopped job's code
SHARED = "use s3://... or an absolute path the nodes share"


# ---------------------------------------------------------------- is the cluster on this machine?


def this_machine() -> set[str]:
    """The addresses of this machine: loopback, its host name's and the one it reaches others from."""
    ips = {"127.0.0.1", "::1"}
    try:
        ips.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            ips.add(s.getsockname()[0])
    except OSError:
        pass
    return ips


def cluster_is_local(address: str, ray: str = "ray") -> bool:
    """Whether every node of the cluster at dashboard ``address`` runs on this machine (so sees its files).

    A dashboard on a loopback address may still be a remote cluster behind a port-forward: its nodes'
    addresses (``ray list nodes``) decide. Any other address counts as remote."""
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if host not in LOOPBACK and not host.startswith("127."):
        return False
    try:
        listed = subprocess.run([ray, "list", "nodes", "--address", address, "--format", "json",
                                 "--filter", "state=ALIVE"], capture_output=True, text=True, timeout=60)
        nodes = [n["node_ip"] for n in json.loads(listed.stdout)] if listed.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        nodes = []
    if not nodes:  # no answer: `ray job submit` will say why; the address alone decides
        return True
    return set(nodes) <= this_machine()


# ---------------------------------------------------------------- paths


def _place(value: str, what: str, cwd: Path, local: bool) -> str:
    """An absolute path (for a local cluster) for the local path ``value`` of setting/option ``what``;
    a relative one for a remote cluster is one ConfigError line."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return value
    if not local:
        sep = " " if what.startswith("--") else "="
        raise ConfigError(f"{what}{sep}{value} is a path on this machine; {SHARED}")
    return str(cwd / path)


def _is_local_argument(value: str | None) -> bool:
    from raysseg.config import is_local_path

    return bool(value) and is_local_path(value)


def _yaml_file(option: str, value: str, cwd: Path, repo: Path, local: bool) -> str:
    """A --config/--space argument as the job must see it: a built-in name as it is, a file here as an
    absolute path (local cluster) or as its path inside the uploaded repository (remote cluster)."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else cwd / path
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        return value  # a built-in name
    if local:
        return str(path)
    try:
        inside = path.resolve().relative_to(repo.resolve())
    except ValueError:
        inside = None
    if inside is not None and not _git_ignored(repo, path):
        return str(inside)  # the job's working directory is the uploaded repository
    if Path(value).expanduser().is_absolute() and inside is None:
        return value  # the user says the nodes share it
    raise ConfigError(f"{option} {value} is a file on this machine that the upload of {repo} does not carry "
                      "(it is outside the repository or .gitignored): put it in the repository, or use a built-in "
                      "name or an absolute path the nodes share")


def _git_ignored(repo: Path, path: Path) -> bool:
    """Whether git ignores ``path`` in ``repo`` (Ray's upload leaves .gitignored files out)."""
    try:
        return subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", str(path)],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def _replace_option(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with every ``option VALUE`` / ``option=VALUE`` set to ``value``, or with it added."""
    out, i, found = [], 0, False
    while i < len(argv):
        if argv[i] == option and i + 1 < len(argv):
            out += [option, value]
            i, found = i + 2, True
            continue
        if argv[i].startswith(option + "="):
            out.append(f"{option}={value}")
            found = True
        else:
            out.append(argv[i])
        i += 1
    return out if found else out + [option, value]


def _replace_set(argv: list[str], key: str, value: str) -> list[str]:
    """``argv`` with every ``--set key=...`` set to ``value``, or with ``--set key=value`` added."""
    out, found = list(argv), False
    for i in range(len(out) - 1):
        if out[i] == "--set" and out[i + 1].split("=", 1)[0].strip() == key:
            out[i + 1], found = f"{key}={value}", True
    return out if found else out + ["--set", f"{key}={value}"]


def _local_store(uri: str) -> str:
    """The path of an MLflow store on this machine named by ``uri`` (``sqlite:///PATH`` or a plain path), else ''."""
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///"):]
    return "" if ":" in uri else uri


def resolve(argv: list[str], cwd: Path, repo: Path, local: bool, env: dict) -> tuple[list[str], dict]:
    """(the raysseg arguments, the environment variables to add) for running ``argv`` as a job from ``cwd``:
    see the module's docstring. Raises ConfigError (one line) for what a remote cluster cannot use."""
    from raysseg.apps.cli import parser
    from raysseg.config import load_config, local_paths

    if any(a in ("-h", "--help", "--version") for a in argv) or not argv:
        return list(argv), {}
    args = parser().parse_args(argv)  # a usage error ends here, exit 2, before anything is uploaded
    out, extra_env = list(argv), {}
    for dest, option in FILE_OPTIONS.items():
        if getattr(args, dest, None):
            out = _replace_option(out, option, _yaml_file(option, getattr(args, dest), cwd, repo, local))
    for dest, option in PATH_OPTIONS.get(args.command, {}).items():
        value = getattr(args, dest, None)
        if _is_local_argument(value):
            given = any(a == option or a.startswith(option + "=") for a in argv)
            if given or local:  # a default --out stays inside the job (the report also goes to MLflow)
                placed = _place(value, option, cwd, local)
                if placed != value:
                    out = _replace_option(out, option, placed)
    configured = ""
    if args.command in CONFIG_COMMANDS:
        cfg = load_config(_yaml_file("--config", args.config, cwd, repo, True), args.set or [], resolve_paths=False)
        for key, value in local_paths(cfg).items():
            placed = _place(value, key, cwd, local)
            if placed != value:
                out = _replace_set(out, key, placed)
        configured = cfg.mlflow.tracking_uri
    uri = configured or env.get("MLFLOW_TRACKING_URI", "")
    store = _local_store(uri)
    if not uri and local:
        extra_env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlruns.db'}"
    elif not uri and args.command in CONFIG_COMMANDS:
        raise ConfigError("MLFLOW_TRACKING_URI is not set: the job would keep its runs in mlruns.db inside Ray's "
                          "temporary upload folder; set it to a tracking server the nodes reach, e.g. "
                          "http://mlflow-host:5000")
    elif store and not Path(store).expanduser().is_absolute():
        what = "mlflow.tracking_uri" if configured else "MLFLOW_TRACKING_URI"
        absolute = f"sqlite:///{_place(store, what, cwd, local)}" if uri.startswith("sqlite:") else \
            _place(store, what, cwd, local)
        if configured:
            out = _replace_set(out, "mlflow.tracking_uri", absolute)
        else:
            extra_env["MLFLOW_TRACKING_URI"] = absolute
    return out, extra_env


# ---------------------------------------------------------------- the job's exit code


def job_exit_code(status_output: str, submit_code: int) -> int:
    """The job's own exit code from what ``ray job status`` printed; ``submit_code`` when it names none
    (e.g. the runtime environment could not be set up, or the job is still running)."""
    if re.search(r"Job '[^']*' succeeded", status_output) or re.search(r"Status for job '[^']*': SUCCEEDED",
                                                                        status_output):
        return 0
    if re.search(r"Job '[^']*' was stopped", status_output):
        return STOPPED_EXIT
    found = re.search(r"Status message: Job entrypoint command failed with exit code (-?\d+)", status_output)
    if not found:
        return submit_code
    code = int(found.group(1))
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says


def submission_id(command: str) -> str:
    return f"raysseg-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != "--repo" or argv[2] != "--":
        print("usage: python -m raysseg.apps.submit --repo REPO -- COMMAND [ARGS...] (see jobs/submit.sh)",
              file=sys.stderr)
        return 2
    repo, command = Path(argv[1]).resolve(), argv[3:]
    address = os.environ.get("RAY_ADDRESS", "")
    if not address:
        print("set RAY_ADDRESS to the cluster's dashboard, e.g. http://127.0.0.1:8265", file=sys.stderr)
        return 2
    beside = Path(sys.executable).parent / "ray"  # the ray of this environment, else the one on PATH
    ray = str(beside) if beside.is_file() else shutil.which("ray")
    if ray is None:
        print("ray: command not found; install this repository (make install) or put ray on PATH", file=sys.stderr)
        return 2
    try:
        args, extra_env = resolve(command, Path.cwd(), repo, cluster_is_local(address, ray), dict(os.environ))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    env = {**os.environ, **extra_env}
    made = subprocess.run([sys.executable, str(repo / "jobs" / "runtime_env.py")], env=env, capture_output=True,
                          text=True)
    if made.returncode != 0:
        print(f"jobs/runtime_env.py failed: {(made.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return 2
    job = submission_id(next((a for a in command if not a.startswith("-")), "job"))
    try:
        submitted = subprocess.run([ray, "job", "submit", "--address", address, "--submission-id", job,
                                    "--working-dir", str(repo), "--runtime-env-json", made.stdout, "--",
                                    "raysseg", *args], env=env)
    except KeyboardInterrupt:
        print(f"\nthe job {job} goes on: `ray job logs -f {job}` follows it, `ray job stop {job}` stops it",
              file=sys.stderr)
        return 130
    status = subprocess.run([ray, "job", "status", "--address", address, job], env=env,
                            capture_output=True, text=True)
    return job_exit_code(status.stdout + status.stderr, submitted.returncode)


if __name__ == "__main__":
    sys.exit(main())
