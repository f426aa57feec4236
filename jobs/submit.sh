#!/usr/bin/env bash
# Submit any raysseg command to a Ray cluster as a job and follow its logs:
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/submit.sh train --config hp_cocostuff --set train.storage=s3://b/runs
# This repository is uploaded as the job's working directory and installed there with the pins of
# requirements.lock, into an environment Ray builds again when pyproject.toml or the lock change
# (jobs/runtime_env.py; RAYSSEG_PREINSTALLED=1: the cluster's image has raysseg). Relative local paths
# become absolute for a cluster on this machine and are refused for a remote one; without
# MLFLOW_TRACKING_URI a local cluster's jobs log to mlruns.db here (raysseg/apps/submit.py). The S3
# endpoint, region and MLFLOW_* are forwarded from this shell; credentials never are (the nodes hold
# their own). The exit code is the job's own (2 for bad input), read from `ray job status`.
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://127.0.0.1:8265 (ray dashboard / port-forward)}"
repo=$(cd "$(dirname "$0")/.." && pwd)
python=python3
if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; fi  # make install's environment
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this repository's raysseg, the one that is uploaded
exec "$python" -m raysseg.apps.submit --repo "$repo" -- "$@"
