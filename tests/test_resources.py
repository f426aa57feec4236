"""What a run asks of the cluster, checked before launch (raysseg.runtime.resources), on a real local Ray of 4 CPUs."""
import pytest

from raysseg.config import ConfigError, load_config
from raysseg.runtime.resources import RunNeeds, WaitWatch, job_placement_groups, plan, remove_job_placement_groups, run_needs


def test_one_runs_needs_come_from_the_config():
    cfg = load_config("hp_camvid", ["train.num_workers=3", "data.cpus=2", "eval.workers=6"])
    assert run_needs(cfg).cpus == 5 and run_needs(cfg).gpus == 0
    assert run_needs(cfg, evaluates=True).cpus == 8  # scoring actors + decoding, after training
    gpu = run_needs(load_config("hp_camvid", ["train.num_workers=2", "train.use_gpu=true"]))
    assert (gpu.cpus, gpu.gpus) == (1, 2)
    assert "data.cpus" not in load_config("hp_camvid", []).run_name() and (
        load_config("hp_camvid", ["data.cpus=3"]).run_name() == load_config("hp_camvid", []).run_name())


def test_a_run_that_cannot_fit_is_one_line_and_a_sweep_runs_what_fits(ray_local, capsys):
    cpu = {"CPU": 1}
    assert plan(RunNeeds(3, cpu, 1), 1) == 1  # 4 of 4 CPUs: fits exactly
    assert plan(RunNeeds(1, cpu, 1), 4) == 2
    assert "running 2 trials at once, not 4 (--max-concurrent)" in capsys.readouterr().out
    with pytest.raises(ConfigError) as e:
        plan(RunNeeds(4, cpu, 1), 1)
    assert str(e.value) == ("one run needs 5 CPUs (train.num_workers=4 workers x 1 CPU + data.cpus=1 for decoding "
                            "and k-means), but the Ray cluster has 4 CPUs in all: lower train.num_workers or "
                            "data.cpus, or add nodes")
    with pytest.raises(ConfigError, match=r"needs 1 CPUs and 1 GPUs .* has 4 CPUs and 0 GPUs in all"):
        plan(RunNeeds(1, {"GPU": 1}, 1), 1)


def test_waiting_placement_groups_are_said_once_a_minute_and_removed_after_a_stop(ray_local, capsys):
    from ray.util.placement_group import placement_group

    group = placement_group([{"CPU": 100}])  # more than the cluster has: stays pending
    watch = WaitWatch(every_s=60)
    watch.tick()
    assert capsys.readouterr().out == ""  # not before a minute
    watch.next = 0
    watch.tick()
    line = capsys.readouterr().out.strip()
    assert line.startswith("waiting for resources: 1 placement group(s) of this job pending (100 CPU); "
                           "the cluster has ") and "of 4 CPUs free" in line, line
    assert [g["id"] for g in job_placement_groups()] == [group.id.hex()]
    assert remove_job_placement_groups() == 1
    assert job_placement_groups() == []
