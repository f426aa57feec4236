"""What every config section is made of: validated fields and the one-line error (pure Python)."""
from __future__ import annotations

from dataclasses import field


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key."""


def setting(default, *, lo=None, hi=None, choices=None, help=""):
    """A dataclass field with validation metadata (inclusive bounds, allowed values)."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"lo": lo, "hi": hi, "choices": choices, "help": help}, **kw)
