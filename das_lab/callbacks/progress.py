"""The training progress bar of ``das-lab train``: Lightning's rich bar, reading metrics at the logging interval."""

from __future__ import annotations

from typing import Optional, Union

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar whose training metrics are read every ``metrics_every_n_steps`` steps.

    Reading a logged metric copies it from the GPU, which waits for every kernel queued so far; the
    stock bar does that after every training step, so the GPU idles while the host starts the next
    one. The counters and timings still move every step; the metrics shown are at most
    ``metrics_every_n_steps`` steps old (``train`` passes ``trainer.log_every_n_steps``).
    """

    def __init__(self, metrics_every_n_steps: int = 20) -> None:
        super().__init__()
        if metrics_every_n_steps < 1:
            raise ValueError(f"metrics_every_n_steps={metrics_every_n_steps}: expected a positive integer")
        self.metrics_every_n_steps = metrics_every_n_steps
        self._metrics: Optional[dict[str, Union[int, str, float, dict[str, float]]]] = None
        self._read_at_step = 0

    def get_metrics(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, Union[int, str, float, dict[str, float]]]:
        step = trainer.global_step
        fresh = self._metrics is None or step - self._read_at_step >= self.metrics_every_n_steps
        if fresh or not trainer.training:
            self._metrics, self._read_at_step = super().get_metrics(trainer, pl_module), step
        return self._metrics
