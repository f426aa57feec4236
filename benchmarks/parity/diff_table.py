"""The parity scripts' table: per quantity, max |ours - theirs| and that over max |theirs|, with a note."""
from __future__ import annotations

import numpy as np


class DiffTable:
    def __init__(self):
        self.rows: list[tuple[str, float, float, str]] = []

    def add(self, name: str, ours, theirs, note: str = "") -> None:
        a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        scale = float(np.abs(b).max()) if b.size else 0.0
        self.rows.append((name, diff, diff / scale if scale > 0 else diff, note))

    def print(self) -> None:
        w = max(len(r[0]) for r in self.rows)
        print(f"{'quantity':<{w}}  {'max abs diff':>12}  {'max rel diff':>12}  note")
        for name, d, r, note in self.rows:
            print(f"{name:<{w}}  {d:12.3e}  {r:12.3e}  {note}")
