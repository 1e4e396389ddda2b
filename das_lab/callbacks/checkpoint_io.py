"""Checkpoints written whole or not at all (Lightning writes straight onto the final path)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from das_lab.atomic_io import write_bytes_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves local checkpoints through a temporary file renamed into place: a full disk or a kill
    during the write leaves the previous ``last.ckpt`` intact instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(Path(path), buffer.getvalue())
