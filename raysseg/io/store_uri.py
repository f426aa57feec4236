"""Where MLflow is: the one rule, importable by every io module (:mod:`raysseg.io.tracking` builds on it)."""
from __future__ import annotations

import os
from pathlib import Path


def tracking_uri(configured: str = "") -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else the local SQLite store ``./mlruns.db``."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path.cwd() / 'mlruns.db'}"
