"""Errors that das-lab reports in one line: problems with the user's input, not bugs in das-lab.

Every command's run wrapper (das_lab.command) prints these as ``das-lab: error: <message>`` and
exits with status 2; any other exception is a bug and keeps its traceback (exit status 1).
"""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """A problem with the user's input (a config value, a file, a folder), reported without a traceback."""


class ConfigError(UserError, ValueError):
    """A config value das-lab cannot use; the message names the key and what it expects."""


class CheckpointError(UserError):
    """A checkpoint file that cannot be used: missing, truncated, foreign or holding pickled objects."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint or weights path that names no file."""


class PickledCheckpointError(CheckpointError, ValueError):
    """A file holding pickled Python objects besides tensors, refused by ``torch.load(weights_only=True)``."""


class RunFolderError(UserError):
    """A run folder that cannot be used: not writable, or holding another run that would be overwritten."""


class NonFiniteError(UserError, FloatingPointError):
    """A tensor of a training step became NaN/Inf; the run stops before it trains on garbage.

    Raised where the value is seen (the loss, a DAS gate's sampling offsets); the step and the
    last good checkpoint are added by :class:`das_lab.callbacks.nonfinite.StopOnNonFiniteLoss`.
    """

    def __init__(self, tensor: str, value: Optional[float] = None) -> None:
        super().__init__(tensor, value)
        self.tensor = tensor
        self.value = value
        self.step: Optional[int] = None
        self.epoch: Optional[int] = None
        self.last_checkpoint: Optional[str] = None

    def __str__(self) -> str:
        value = "NaN/Inf" if self.value is None else str(self.value)
        where = "" if self.step is None else f" at step {self.step} (epoch {self.epoch})"
        checkpoint = "" if self.step is None else f", last good checkpoint: {self.last_checkpoint or 'none yet'}"
        return (
            f"{self.tensor} became {value}{where}; training stopped{checkpoint}. Lower optimizer.lr, "
            f"set trainer.gradient_clip_val, or check the data for NaN/Inf values"
        )
