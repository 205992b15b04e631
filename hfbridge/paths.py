"""Where hfbridge keeps what it makes once and reuses: the converted default model, built CPU kernels."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$HFBRIDGE_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/hfbridge."""
    explicit = os.environ.get("HFBRIDGE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "hfbridge"
