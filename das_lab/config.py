"""Where das-lab's Hydra configs live, installed or in a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The folder holding train.yaml and the config groups.

    A wheel ships the configs inside the package (``das_lab/conf``); a checkout or an editable
    install reads the top-level ``conf/`` next to the package.
    """
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"das-lab configs not found: expected train.yaml in {_PACKAGE_DIR / 'conf'} (installed wheel) "
        f"or {_PACKAGE_DIR.parent / 'conf'} (checkout); reinstall das-lab with `pip install .`"
    )
