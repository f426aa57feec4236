"""STEGO against the released code's outputs (golden values written by benchmarks/parity/stego.py from
github mhamilton723/STEGO): the correlation tensor, the point sampling, the shifted loss of each pair kind,
the weighted total and the head's gradients, and the KNN selection, without the released code."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests/fixtures/parity/stego.npz"


def _parity():
    spec = importlib.util.spec_from_file_location("stego_parity", ROOT / "benchmarks/parity/stego.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _golden():
    with np.load(GOLDEN) as f:
        inputs = {k[3:]: f[k] for k in f.files if k.startswith("in.")}
        outputs = {k[4:]: f[k] for k in f.files if k.startswith("out.")}
    drawn = {k: inputs.pop(k) for k in ("coords1", "coords2", "partners")}
    return inputs, drawn, outputs


def _mismatches(parity, inputs, drawn, outputs, rtol=1e-5):
    return [(key, rel) for key, _, rel in parity.compare(parity.ours(inputs, drawn), outputs) if rel > rtol]


def test_every_quantity_matches_the_released_code():
    parity = _parity()
    inputs, drawn, outputs = _golden()
    assert set(parity.ours(inputs, drawn)) == set(outputs)
    assert _mismatches(parity, inputs, drawn, outputs) == []


@pytest.mark.parametrize("kind", ["self", "knn", "random"])
def test_a_loss_term_changed_by_1e_4_fails(kind, monkeypatch):
    parity = _parity()
    inputs, drawn, outputs = _golden()
    monkeypatch.setitem(parity.SHIFTS, kind, parity.SHIFTS[kind] + 1e-4)
    failed = dict(_mismatches(parity, inputs, drawn, outputs))
    assert f"loss_{kind}" in failed and "loss_total" in failed, failed
