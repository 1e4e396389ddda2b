"""A callback for tests that signal a training process: it holds training at an epoch until the signal lands.

Tests that wait for a file and then signal race the process when a loaded machine wakes them late:
the run may finish first. ``PauseAtEpoch`` writes ``ready_file`` and waits, in short sleeps that
SIGINT interrupts and that end when Lightning has seen SIGTERM, up to ``timeout`` seconds; only
once, so that the run resumed with the same overrides does not wait.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L


class PauseAtEpoch(L.Callback):
    def __init__(self, ready_file: str, epoch: int = 1, timeout: float = 60.0) -> None:
        self.ready_file = Path(ready_file)
        self.epoch = epoch
        self.timeout = timeout

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != self.epoch or self.ready_file.exists():  # once: a resumed run goes on
            return
        self.ready_file.write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)
