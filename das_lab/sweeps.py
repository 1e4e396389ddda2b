"""Helpers that Hydra sweeper configs instantiate (``conf/hparams_search``)."""

from __future__ import annotations

from pathlib import Path


def sqlite_storage(path: str) -> str:
    """SQLAlchemy URL of an SQLite file, creating its folder (the sweep folder does not exist before the first job)."""
    file = Path(path).expanduser().absolute()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"
