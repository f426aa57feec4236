"""The GPU benchmark's CPU mode, run as on the GPU machine: torch, timm, scikit-image and
scikit-learn only (Ray, MLflow, faiss, pyarrow and boto3 made unimportable)."""
import subprocess
import sys
from pathlib import Path

from raysseg.apps.bench_steps import GPU_SELECTIONS, HEADER, PAPER_SETTINGS

BLOCKED = ("ray", "mlflow", "faiss", "pyarrow", "boto3", "botocore")
RUN = f"""
import runpy, sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Blocked())
sys.argv = ['bench_steps', '--device', 'cpu', '--steps', '1', '--out', sys.argv[1]]
runpy.run_module('raysseg.apps.bench_steps', run_name='__main__')
"""


def test_gpu_benchmark_cpu_mode_runs_without_ray_mlflow_faiss(tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, "-c", RUN, str(out)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| " + " | ".join(HEADER) + " |"
    done = {(row.split(" | ")[0][2:], row.split(" | ")[3]) for row in rows[1:]}
    # HP also in bf16 once per low-precision selection, its line giving the share of pairs re-checked
    assert done == ({(m, p) for m in PAPER_SETTINGS for p in ("fp32", "bf16")}
                    | {(f"hp ({s})", "bf16") for s in GPU_SELECTIONS})
    for selection in GPU_SELECTIONS:
        line = next(x for x in proc.stdout.splitlines() if x.startswith(f"[bench gpu] hp ({selection}) bf16:"))
        assert "of pairs re-checked" in line, line
    for row in rows[1:]:
        cells = row.strip("| ").split(" | ")
        assert float(cells[4]) > 0 and "nan" not in row, row  # images/s, and every FLOP/s share computed


def test_the_steps_can_run_on_a_folder_of_images(tmp_path, capsys):
    import numpy as np
    import pytest
    from PIL import Image

    from raysseg.apps import cli
    from raysseg.apps.bench_steps import folder_images, step_benchmark

    (tmp_path / "images" / "a").mkdir(parents=True)
    ramp = np.tile(np.arange(60, dtype=np.uint8)[None, :, None], (40, 1, 3))  # 40 x 60, brighter to the right
    Image.fromarray(ramp).save(tmp_path / "images" / "a" / "1.png")
    Image.fromarray(255 - ramp).save(tmp_path / "images" / "0.jpg")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    images = folder_images(str(tmp_path), 8, 20)  # short side 40 -> 20, then the centre 20 x 20 of 20 x 30
    assert images.shape == (2, 20, 20, 3) and images.dtype == np.uint8
    assert images[1, 0, 0, 0] < images[1, 0, -1, 0]  # sorted paths: 0.jpg first, then a/1.png, its ramp kept
    assert abs(int(images[1, 0, 10, 0]) - 30) <= 3  # the centre column of the 60-wide ramp
    result = step_benchmark("hp", "cpu", "fp32", ["train.batch_size=2"], steps=1, warmup=1, scenes=str(tmp_path))
    assert result.step_gflop > 0
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "demand", "--method", "hp", "--scenes", str(tmp_path / "images" / "a" / "none")])
    assert stop.value.code == 2 and "--scenes" in capsys.readouterr().err

