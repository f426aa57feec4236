#!/usr/bin/env bash
# Submit the runs of one paper table to the Ray cluster at RAY_ADDRESS, one job per row (jobs/submit.sh),
# one after the other; each job resumes when submitted again. Tables (README "Reproducing the papers"):
#   hp-table1      HP, COCO-Stuff-27, DINO ViT-S/8 and ViT-S/16 (released loss form)
#   hp-table2      HP, Cityscapes-27, DINO ViT-B/8 (released loss form)
#   hp-table3      HP, Potsdam-3, DINO ViT-B/8 (released loss form)
#   pgg            PGG Table 1, COCO-Stuff-27, ResNet-50 + FPN: PiCIE* (MoCo v2 init) and PGG + CAE
#   segsort-voc    unsupervised SegSort, PASCAL VOC 2012
#   concepts-voc   visual concepts, PASCAL VOC 2012
# The data comes from `raysseg data prepare` (the configs read s3://datasets/<dataset>/<split>); each row names
# its backbone weights (`raysseg weights list`: fetched into each node's cache on first use; nodes without
# network: `raysseg weights fetch NAME --to s3://b/weights`, then --set model.weights=s3://b/weights/<file>).
# Pass the storage with --set, e.g.
#   RAY_ADDRESS=http://head:8265 jobs/reproduce.sh hp-table1 --set train.storage=s3://b/runs
# PGG table 1 (COCO only) starts from MoCo v2 trained on COCO: `raysseg pretrain --config pgg_cocostuff` first,
# then --set model.weights=<its backbone.pt>; the configs name the ImageNet MoCo v2 (mocov2_r50_800ep).
# Each row is `raysseg run` (train, then evaluate the final checkpoint on the val split: clusters with
# Hungarian matching, linear probe, CRF). --dry-run prints one `raysseg run ...` line per row instead of submitting.
set -euo pipefail
usage="usage: jobs/reproduce.sh {hp-table1|hp-table2|hp-table3|pgg|segsort-voc|concepts-voc} [--dry-run] [--row N] [--set key=value ...]"
table=${1:-}
shift || true
dry_run=0
row=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --row) row=${2:?$usage}; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
rows=()
case "$table" in
  hp-table1)
    rows+=("--config hp_cocostuff_released")
    rows+=("--config hp_cocostuff_released --set model.backbone=vit_small_patch16 --set model.weights=dino_vits16 --set model.code_dim=256 --set hp.sigma=14.0") ;;
  hp-table2) rows+=("--config hp_cityscapes_released") ;;
  hp-table3) rows+=("--config hp_potsdam_released --set model.backbone=vit_base_patch8 --set model.weights=dino_vitb8") ;;
  pgg)
    rows+=("--config picie_cocostuff")
    rows+=("--config pgg_cocostuff") ;;
  segsort-voc) rows+=("--config segsort_voc") ;;
  concepts-voc) rows+=("--config concepts_voc") ;;
  *) echo "jobs/reproduce.sh: unknown table '$table'; $usage" >&2; exit 2 ;;
esac
n=0
for r in "${rows[@]}"; do
  n=$((n + 1))
  if [ "$row" -ne 0 ] && [ "$row" -ne "$n" ]; then continue; fi
  read -r -a args <<< "$r"
  if [ "$dry_run" -eq 1 ]; then
    echo "raysseg run ${args[*]} ${extra[*]:-}"
  else
    echo "[reproduce $table] row $n: raysseg run ${args[*]}" >&2
    "$(dirname "$0")/submit.sh" run "${args[@]}" "${extra[@]}"
  fi
done
