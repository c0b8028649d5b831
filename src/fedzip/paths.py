"""Where fedzip keeps things on a user's machine: one cache folder for converted models, data and Arrow copies."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | None = None) -> Path:
    """``cache_dir`` if given, else ``$FEDZIP_CACHE``, else ``~/.cache/fedzip``."""
    return Path(cache_dir or os.environ.get("FEDZIP_CACHE") or Path.home() / ".cache" / "fedzip").expanduser()


def default_data_root() -> Path:
    """The data root when neither ``data.root`` nor ``$FEDZIP_DATA`` is set."""
    return cache_root() / "data"
