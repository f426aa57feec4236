#!/usr/bin/env bash
# Segment an image collection on the cluster at RAY_ADDRESS, from object storage to object storage:
#   RAY_ADDRESS=http://head:8265 MLFLOW_TRACKING_URI=http://mlflow:5000 \
#     jobs/predict.sh models:/camvid@best s3://bucket/photos s3://bucket/segmented --workers 8 --gpus-per-worker 1
# The checkpoint may also be s3://.../model.pt or runs:/<run id>/checkpoint. Running it again resumes;
# --overlays also writes colour overlays, --overwrite runs the model again on finished images.
set -euo pipefail
usage="usage: jobs/predict.sh CHECKPOINT SRC DST [--workers N] [--gpus-per-worker G] [--overlays] [--overwrite]"
checkpoint=${1:?$usage}
images=${2:?$usage}
out=${3:?$usage}
shift 3
exec "$(dirname "$0")/submit.sh" predict --checkpoint "$checkpoint" --images "$images" --out "$out" "$@"
