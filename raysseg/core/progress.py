"""Progress lines: step, values, speed and time left."""
from __future__ import annotations

import time


class Progress:
    def __init__(self, total: int, label: str, every: int):
        self.total, self.label, self.every = total, label, every
        self.start = time.time()
        self.done = 0

    def update(self, n: int = 1, **values) -> None:
        self.done += n
        if self.done % self.every and self.done != self.total:
            return
        rate = self.done / max(time.time() - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        extra = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        print(f"[{self.label}] {self.done}/{self.total} {extra} {rate:.2f}/s, {left:.0f}s left", flush=True)
