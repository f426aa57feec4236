"""The multi-seed quality protocol: the dev split, the paired summary, and resumable runs."""
from __future__ import annotations

import json

import pytest

from raysseg.apps.quality import (Run, baseline_overrides, goal_met, per_class_table, plan_runs, run_all, run_name,
                                  runs_to_do, split_dataset, summarise, table)
from raysseg.core.metrics import EvalInputError
from raysseg.core.pictures import per_class_figure
from raysseg.settings import ConfigError


def test_the_dev_split_is_a_seeded_partition_with_labels_and_is_reused(tmp_path, synth_data):
    train, dev = split_dataset(str(synth_data / "train"), str(tmp_path / "split"), dev=3, seed=0)
    names = {part: sorted(p.name for p in (tmp_path / "split" / part / "images").iterdir()) for part in ("train", "dev")}
    source = sorted(p.name for p in (synth_data / "train" / "images").iterdir())
    assert len(names["dev"]) == 3 and len(names["train"]) == 5
    assert sorted(names["dev"] + names["train"]) == source  # a partition: nothing lost, nothing twice
    for part in ("train", "dev"):
        labels = sorted(p.stem for p in (tmp_path / "split" / part / "labels").iterdir())
        assert labels == sorted(n.rsplit(".", 1)[0] for n in names[part])
    stamp = (tmp_path / "split" / "split.json").stat().st_mtime_ns
    assert split_dataset(str(synth_data / "train"), str(tmp_path / "split"), dev=3, seed=0) == (train, dev)
    assert (tmp_path / "split" / "split.json").stat().st_mtime_ns == stamp  # reused, not copied again
    other = tmp_path / "other"
    split_dataset(str(synth_data / "train"), str(other), dev=3, seed=1)
    assert sorted(p.name for p in (other / "dev" / "images").iterdir()) != names["dev"]
    with pytest.raises(ConfigError, match="between 1 and 7"):
        split_dataset(str(synth_data / "train"), str(tmp_path / "bad"), dev=8)


def test_each_method_is_paired_with_kmeans_on_its_own_backbone():
    runs = plan_runs(["picie_camvid", "pgg_camvid", "hp_camvid"], [0, 1], ())
    baselines = [r for r in runs if not r.baseline]
    assert len(baselines) == 4  # one R18 and one ViT baseline per seed, shared by PiCIE and PGG
    assert {r.baseline for r in runs if r.baseline} == {b.label for b in baselines}
    vit = dict(o.split("=", 1) for o in baseline_overrides("hp_camvid", ()))
    assert vit["model.backbone"] == "vit_small_patch16" and vit["data.image_size"] == "176"
    r18 = dict(o.split("=", 1) for o in baseline_overrides("picie_camvid", ("data.image_size=96",)))
    assert r18["model.backbone"] == "resnet18_fpn" and r18["data.image_size"] == "96"
    moco = plan_runs(["pgg_camvid"], [0], ("model.weights=s3://b/runs/pgg_camvid-pretrain-54c00089/backbone.pt",))
    assert moco[0].label == "k-means (resnet18_fpn, 128 px, from pgg_camvid-pretrain-54c00089)"
    assert "model.weights=s3://b/runs/pgg_camvid-pretrain-54c00089/backbone.pt" in moco[0].overrides
    # a k-means spec is only a baseline row: on pgg's backbone settings it is the very run pgg is paired with
    alone = plan_runs(["kmeans_camvid+model.backbone=resnet18_fpn+data.image_size=128+kmeans.pixels_per_image=200"
                       "+kmeans.n_clusters=11"],
                      [0, 1], ())
    assert [r.baseline for r in alone] == ["", ""] and alone[0].label == "k-means (resnet18_fpn, 128 px)"
    assert alone[0].key == plan_runs(["pgg_camvid"], [0], ())[0].key


def _scores(miou: float) -> dict:
    return {v: {"accuracy": 0.5, "miou": miou} for v in ("clusters", "clusters_crf", "probe", "retrieval")}


def test_the_summary_gives_mean_std_and_the_difference_paired_by_seed():
    base = [Run("k-means", "kmeans_camvid", ("x=1",), s) for s in range(3)]
    method = [Run("picie", "picie_camvid", (), s, "k-means") for s in range(3)]
    results = {}
    for run, miou in zip(base + method, (0.10, 0.20, 0.30, 0.13, 0.22, 0.36)):
        results[run.key] = {"scores": _scores(miou)}
    summary = summarise(base + method, results)
    assert summary["picie"]["scores"]["clusters_miou"] == pytest.approx([0.13, 0.22, 0.36])
    assert summary["picie"]["vs_baseline"]["clusters_miou"] == pytest.approx([0.03, 0.02, 0.06])
    text = table(summary, "t")
    # mean 23.7, sample std 11.6; differences +3.7 ± 2.1 (by hand: 3, 2, 6)
    assert "| picie | 3 | 23.7 ± 11.6 | +3.7 ± 2.1 |" in text
    assert "| k-means | 3 | 20.0 ± 10.0 |  |" in text
    assert text.splitlines()[-1].endswith("| yes |")  # +3.7 >= 2 and > 2.1
    assert text.splitlines()[-2].endswith("|  |")  # the baseline has no goal


def test_the_goal_column_needs_two_points_and_more_than_the_std():
    assert goal_met([0.03, 0.02, 0.06]) == "yes"
    assert goal_met([0.01, 0.015, 0.02]) == "**no**"  # +1.5: above its std, below 2 points
    assert goal_met([-0.02, 0.01, 0.10]) == "**no**"  # +3.0 ± 6.2: a spread as large as the gain
    assert goal_met([0.05]) == "one seed: no std" and goal_met([]) == ""
    assert goal_met([0.03, 0.02, 0.06], [0.0, 0.01, -0.005]) == "yes"  # probe +0.2 on average: not below
    assert goal_met([0.03, 0.02, 0.06], [-0.01, -0.02, 0.005]) == "**no** (probe below)"


@pytest.mark.slow
def test_runs_are_recorded_and_not_run_again(tmp_path, synth_data):
    data = (f"data.train={synth_data / 'train'}", f"data.val={synth_data / 'val'}", "eval.probe=false",
            "eval.retrieval=false", "eval.crf=false")
    runs = [Run("k-means", "kmeans_synth", data, 0)]
    results = run_all(runs, tmp_path)
    first = results[runs[0].key]
    assert 0 < first["scores"]["clusters"]["miou"] <= 1
    assert len(first["per_class_iou"]) == len(first["class_names"]) > 1
    assert json.loads((tmp_path / "results.json").read_text())[runs[0].key]["seconds"] == first["seconds"]
    again = run_all(runs, tmp_path)
    assert again[runs[0].key]["seconds"] == first["seconds"]  # read back, not trained again


def test_a_variant_is_its_own_row_on_the_same_baseline():
    runs = plan_runs(["segsort_camvid", "segsort_camvid+segsort.min_cells=8"], [0], ())
    assert [r.label for r in runs] == ["k-means (resnet18_fpn, 128 px)", "segsort", "segsort (segsort.min_cells=8)"]
    assert runs[2].overrides == ("segsort.min_cells=8",) and runs[2].baseline == runs[0].label
    with pytest.raises(ConfigError, match=r"\+key=value"):
        plan_runs(["segsort_camvid+min_cells"], [0], ())


def test_one_seed_shows_no_spread():
    runs = [Run("k-means", "kmeans_camvid", (), 0), Run("hp", "hp_camvid", (), 0, "k-means")]
    results = {runs[0].key: {"scores": _scores(0.10)}, runs[1].key: {"scores": _scores(0.125)}}
    assert "| hp | 1 | 12.5 | +2.5 |" in table(summarise(runs, results), "t")


def test_per_class_iou_is_averaged_over_seeds_and_set_beside_the_baseline(tmp_path):
    base = [Run("k-means", "kmeans_camvid", (), s) for s in range(2)]
    method = [Run("pgg", "pgg_camvid", (), s, "k-means") for s in range(2)]
    names = ["sky", "road"]
    results = {}
    for run, ious in zip(base + method, ([0.4, 0.2], [0.6, 0.2], [0.3, 0.5], [0.5, 0.7])):
        results[run.key] = {"scores": _scores(0.3), "class_names": names, "per_class_iou": ious}
    # a run recorded before per-class scores were kept: read from its report
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"class_names": names, "scores": {"clusters": {"per_class_iou": [0.5, 0.7]}}}))
    results[method[1].key] = {"scores": _scores(0.3), "report": str(report)}
    summary = summarise(base + method, results)
    assert summary["k-means"]["per_class_iou"]["mean"] == pytest.approx([0.5, 0.2])
    assert summary["pgg"]["per_class_iou"]["mean"] == pytest.approx([0.4, 0.6])
    assert summary["pgg"]["per_class_iou"]["std"] == pytest.approx([0.1414, 0.1414], abs=1e-4)  # sqrt(0.02)
    text = per_class_table(summary)
    assert "| clusters IoU, mean over seeds | sky | road |" in text
    assert "| k-means | 50.0 | 20.0 |" in text
    assert "| pgg | 40.0 (-10.0) | 60.0 (+40.0) |" in text
    png = per_class_figure({k: (e["per_class_iou"]["mean"], e["per_class_iou"]["std"]) for k, e in summary.items()},
                           names, "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(EvalInputError, match="'pgg' has 1 means"):
        per_class_figure({"pgg": ([0.1], [0.0])}, names, "t")
    del results[method[1].key]["report"]  # a row with a seed lacking per-class scores gets no per-class cells
    assert "per_class_iou" not in summarise(base + method, results)["pgg"]


def test_a_result_recorded_under_other_defaults_is_run_again(tmp_path):
    """Results are keyed by the overrides; a changed default changes the training run's name, not the key."""
    runs = plan_runs(["picie_camvid", "concepts_camvid"], [0], ())
    kmeans, picie, concepts = runs
    old = tmp_path / "report.json"  # a result recorded before run names were kept: read from its checkpoint path
    old.write_text(json.dumps({"checkpoint": str(tmp_path / "runs" / "concepts_camvid-a1d019ac" / "c_1" / "model.pt")}))
    results = {kmeans.key: {"run_name": run_name(kmeans, tmp_path)},  # the same settings today
               picie.key: {"scores": {}},                            # nothing to tell by: kept
               concepts.key: {"report": str(old)}}                    # trained with another default
    todo, stale = runs_to_do(runs, results, tmp_path)
    assert todo == stale == [concepts]
    assert run_name(concepts, tmp_path).startswith("concepts_camvid-") and run_name(concepts, tmp_path) != \
        "concepts_camvid-a1d019ac"
    del results[picie.key]
    assert runs_to_do(runs, results, tmp_path)[0] == [picie, concepts]
