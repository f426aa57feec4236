#!/usr/bin/env bash
# Submit a training run to a Ray cluster:
#   RAY_ADDRESS=http://head:8265 MLFLOW_TRACKING_URI=http://mlflow:5000 \
#     jobs/train.sh hp_cocostuff --set model.weights=s3://bucket/dino.pth --set train.storage=s3://bucket/runs
# The working directory is uploaded; the cluster installs raysseg from it (pip: ["."]).
# Object-storage credentials are passed from this shell's environment.
set -euo pipefail
config=${1:?usage: jobs/train.sh CONFIG [--set key=value ...]}
shift
env_json=$(python3 - <<'PY'
import json, os
keys = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION", "MLFLOW_TRACKING_URI"]
print(json.dumps({"pip": ["."], "env_vars": {k: os.environ[k] for k in keys if k in os.environ}}))
PY
)
exec ray job submit --working-dir . --runtime-env-json "$env_json" -- raysseg train --config "$config" "$@"
