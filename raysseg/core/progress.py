"""Progress lines: step, values, speed and time left."""
from __future__ import annotations

import sys
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


class ProgressLine:
    """One progress line for a count of ``unit``: rewritten in place on a terminal (at most twice a second),
    elsewhere (a log, a pipe) a new line at most every ``every_s`` seconds; the last one ends with the time taken."""

    def __init__(self, label: str, unit: str, every_s: float = 10.0):
        self.label, self.unit, self.every_s = label, unit, every_s
        self.tty = sys.stdout.isatty()
        self.start = self.last = time.time()
        self.width = 0

    def update(self, done: int, total: int) -> None:
        now = time.time()
        final = done >= total
        if not final and now - self.last < (0.5 if self.tty else self.every_s):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        if final:
            line = f"[{self.label}] {done} {self.unit} in {now - self.start:.1f} s ({rate:.1f}/s)"
        else:
            left = (total - done) / max(rate, 1e-9)
            line = f"[{self.label}] {done}/{total} {self.unit}, {rate:.1f}/s, {left:.0f}s left"
        if self.tty:
            self.width = max(self.width, len(line))
            print("\r" + line.ljust(self.width), end="\n" if final else "", flush=True)
        else:
            print(line, flush=True)
