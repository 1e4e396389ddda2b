"""Dataset archives extracted once into ``<data.cache_dir>/<dataset>/<key>``; the user's dataset folder is only ever read."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)

_COMPLETE_MARKER = ".das_lab_extracted"


def _archive_key(archives: Sequence[Path]) -> str:
    digest = hashlib.sha1()
    for archive in archives:
        stat = archive.stat()
        digest.update(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def extract_once(
    archives: Sequence[Path], cache_dir: str | Path, dataset: str, extract: Callable[[Path], None]
) -> Path:
    """Extract archives into ``<cache_dir>/<dataset>/<key>`` the first time only, never beside them.

    The key hashes the archives' paths, sizes and mtimes, so a replaced archive is extracted again.
    Extraction goes to a temporary folder renamed into place when complete: an interrupted run
    leaves no half-extracted cache behind, and concurrent runs cannot read a partial one.
    """
    target = Path(cache_dir).expanduser() / dataset / _archive_key(archives)
    names = ", ".join(str(a) for a in archives)
    if (target / _COMPLETE_MARKER).is_file():
        log.info("%s: using the copy of %s extracted earlier in %s", dataset, names, target)
        return target
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log.info("%s: extracting %s into %s (once; later runs reuse it)", dataset, names, target)
    try:
        extract(partial)
        (partial / _COMPLETE_MARKER).write_text("\n".join(str(a) for a in archives) + "\n")
        os.rename(partial, target)
    except OSError:
        if not (target / _COMPLETE_MARKER).is_file():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def extract_tar(archive: Path, destination: Path) -> None:
    """Extract a (possibly compressed) tar refusing absolute paths, links out of it and devices."""
    with tarfile.open(archive) as tar:
        tar.extractall(destination, filter="data")
