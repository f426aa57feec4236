#!/usr/bin/env bash
# Train (or resume) a run on the cluster at RAY_ADDRESS:
#   RAY_ADDRESS=http://head:8265 MLFLOW_TRACKING_URI=http://mlflow:5000 \
#     jobs/train.sh hp_cocostuff --set model.weights=s3://bucket/dino.pth --set train.storage=s3://bucket/runs
set -euo pipefail
config=${1:?usage: jobs/train.sh CONFIG [--set key=value ...]}
shift
exec "$(dirname "$0")/submit.sh" train --config "$config" "$@"
