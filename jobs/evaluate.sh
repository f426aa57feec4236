#!/usr/bin/env bash
# Evaluate a checkpoint on the cluster at RAY_ADDRESS; scores and pictures go to its MLflow run:
#   RAY_ADDRESS=http://head:8265 MLFLOW_TRACKING_URI=http://mlflow:5000 \
#     jobs/evaluate.sh runs:/<run id>/checkpoint [--split s3://bucket/voc/val] [--no-crf]
# The checkpoint may also be s3://.../model.pt or models:/<name>@<alias>.
set -euo pipefail
checkpoint=${1:?usage: jobs/evaluate.sh CHECKPOINT [--split ...] [--no-crf] [--no-probe]}
shift
exec "$(dirname "$0")/submit.sh" evaluate --checkpoint "$checkpoint" "$@"
