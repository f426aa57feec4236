#!/usr/bin/env bash
# Submit any raysseg command to a Ray cluster as a job and follow its logs:
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/submit.sh train --config hp_cocostuff --set train.storage=s3://b/runs
# This repository is uploaded as the job's working directory (--working-dir .) and installed
# there (see jobs/runtime_env.py; RAYSSEG_PREINSTALLED=1 skips that). The S3 endpoint, region
# and MLFLOW_* are forwarded from this shell; credentials never are (the nodes hold their own).
# The exit code is the job's.
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://127.0.0.1:8265 (ray dashboard / port-forward)}"
cd "$(dirname "$0")/.."
runtime_env=$(python3 jobs/runtime_env.py)
exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" -- raysseg "$@"
