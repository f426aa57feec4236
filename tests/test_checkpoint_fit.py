"""A checkpoint whose weights do not fit its own config (another backbone) is one line, before Ray starts,
in every command that loads one: evaluate, predict and concepts (raysseg.io.checkpoints.read_checkpoint)."""
import io
import lzma
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"


@pytest.fixture()
def misfit(tmp_path) -> str:
    """The k-means fixture (ViT-S/16 weights) whose config names a ResNet-18 FPN."""
    ckpt = torch.load(io.BytesIO(lzma.decompress((FIXTURES / "kmeans.pt.xz").read_bytes())), weights_only=False)
    assert ckpt["config"]["model"]["backbone"].startswith("vit")
    ckpt["config"]["model"]["backbone"] = "resnet18_fpn"
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    return str(path)


def test_the_fixture_itself_fits(tmp_path):
    from raysseg.io.checkpoints import read_checkpoint

    path = tmp_path / "model.pt"
    path.write_bytes(lzma.decompress((FIXTURES / "kmeans.pt.xz").read_bytes()))
    assert read_checkpoint(str(path))["config"]["model"]["backbone"].startswith("vit")


def test_evaluate_with_a_checkpoint_of_another_backbone_is_one_line_before_ray(misfit, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raysseg.apps.cli", "evaluate", "--checkpoint", misfit],
                          capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1, lines
    assert "does not fit its config" in lines[0] and "resnet18_fpn" in lines[0] and misfit in lines[0]
    assert "Ray" not in proc.stdout + proc.stderr  # nothing started


@pytest.mark.parametrize("command", [
    ["predict", "--checkpoint", "{ckpt}", "--images", "{data}/val/images", "--out", "{tmp}/out"],
    ["concepts", "--checkpoint", "{ckpt}", "--split", "{data}/val", "--out", "{tmp}/out"],
])
def test_predict_and_concepts_with_a_checkpoint_of_another_backbone_are_one_line(command, misfit, synth_data, tmp_path,
                                                                                 capsys):
    from raysseg.apps.cli import main

    with pytest.raises(SystemExit) as stop:
        main([a.format(ckpt=misfit, tmp=tmp_path, data=synth_data) for a in command])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert "does not fit its config" in lines[0] and "resnet18_fpn" in lines[0]
