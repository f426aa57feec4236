"""The GPU benchmark's CPU mode, run as on the GPU machine: torch, timm, scikit-image and
scikit-learn only (Ray, MLflow, faiss, pyarrow and boto3 made unimportable)."""
import subprocess
import sys
from pathlib import Path

from raysseg.apps.bench_steps import HEADER, PAPER_SETTINGS

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
    assert done == {(m, p) for m in PAPER_SETTINGS for p in ("fp32", "bf16")}
    for row in rows[1:]:
        cells = row.strip("| ").split(" | ")
        assert float(cells[4]) > 0 and "nan" not in row, row  # images/s, and every FLOP/s share computed
