#!/usr/bin/env bash
# Run (or resume: submit the same command again) a Ray Tune sweep on the cluster at RAY_ADDRESS:
#   RAY_ADDRESS=http://head:8265 MLFLOW_TRACKING_URI=http://mlflow:5000 \
#     jobs/sweep.sh concepts_voc concepts_beta --set train.storage=s3://bucket/runs --max-concurrent 4
# train.storage must be shared storage (s3://) so that the sweep and its trials can resume anywhere.
set -euo pipefail
config=${1:?usage: jobs/sweep.sh CONFIG SWEEP [--set key=value ...] [--max-concurrent N]}
space=${2:?usage: jobs/sweep.sh CONFIG SWEEP [--set key=value ...] [--max-concurrent N]}
shift 2
exec "$(dirname "$0")/submit.sh" sweep --config "$config" --space "$space" "$@"
