"""The classification task: loss, metrics, LR scaling, per-step schedule, Mixup, NaN stop."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import TensorDataset

from das_lab.callbacks.nonfinite import StopOnNonFiniteLoss
from das_lab.data.datamodule import DataModuleBase
from das_lab.errors import NonFiniteError
from das_lab.tasks.classification import ClassificationModule


class TinyData(DataModuleBase):
    def __init__(self, batch_size: int = 8, n: int = 64) -> None:
        super().__init__(batch_size=batch_size, num_workers=0)
        self.num_classes = 4
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, 8, 8, generator=generator)
        y = torch.arange(n) % 4
        x[torch.arange(n), 0, 0, y] += 3.0  # learnable signal: class k lights pixel (0, k)
        self.dataset = TensorDataset(x, y)

    def setup(self, stage=None) -> None:
        self.train_set = self.val_set = self.test_set = self.dataset


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 4, poison: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(3 * 8 * 8, num_classes)
        self.poison = poison

    def forward(self, x):
        logits = self.fc(x.flatten(1))
        return logits * float("nan") if self.poison else logits


class LrTrace(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _trainer(tmp_path, **kwargs):
    settings = dict(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**settings, **kwargs})


def _module(net=None, lr=0.1, scheduler=None, **kwargs):
    optimizer = partial(create_optimizer_v2, opt="sgd", lr=lr, momentum=0.9, weight_decay=0.0)
    return ClassificationModule(net or TinyNet(), optimizer, scheduler, **kwargs)


def test_lr_is_scaled_by_global_batch(tmp_path):
    trace = LrTrace()
    _trainer(tmp_path, max_epochs=1, callbacks=[trace]).fit(_module(lr=0.1, lr_reference_batch=256), TinyData(16))
    assert trace.lrs[0] == pytest.approx(0.1 * 16 / 256)


def test_warmup_then_cosine_per_step(tmp_path):
    scheduler = partial(
        create_scheduler_v2, sched="cosine", warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-3, warmup_prefix=True
    )
    trace = LrTrace()
    _trainer(tmp_path, max_epochs=4, callbacks=[trace]).fit(_module(lr=0.1, scheduler=scheduler), TinyData(8))
    steps_per_epoch = 64 // 8
    warmup = trace.lrs[:steps_per_epoch]
    assert warmup[0] == pytest.approx(1e-4)
    assert all(b > a for a, b in zip(warmup, warmup[1:]))  # rises every step, not every epoch
    assert trace.lrs[steps_per_epoch] == pytest.approx(0.1, rel=1e-6)
    decay = trace.lrs[steps_per_epoch:]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    last = len(decay) - 1  # the cosine reaches min_lr right after the last step
    assert decay[-1] == pytest.approx(1e-3 + (0.1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * last / len(decay))))


def test_training_learns_and_logs_contract_metrics(tmp_path):
    trainer = _trainer(tmp_path, max_epochs=3)
    data = TinyData(8)
    module = _module(lr=0.05, label_smoothing=0.1)
    trainer.fit(module, data)
    metrics = dict(trainer.callback_metrics)
    assert {"train/loss", "train/lr", "val/loss", "val/acc1", "val/acc5"} <= set(metrics)
    assert metrics["val/acc1"] > 0.9 and metrics["val/acc5"] == 1.0  # 4 classes: top-5 covers all
    trainer.test(module, data, verbose=False)
    assert trainer.callback_metrics["test/acc1"] == pytest.approx(float(metrics["val/acc1"]))


def test_mixup_uses_soft_targets(tmp_path):
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    module = _module(mixup=mixup)
    module.trainer = _trainer(tmp_path)
    images, targets = TinyData(8).dataset[:8]
    torch.manual_seed(0)
    mixed, soft = mixup(images.clone(), targets.clone())
    assert soft.shape == (8, 4) and torch.allclose(soft.sum(1), torch.ones(8))
    loss = module.mixup_criterion(module(mixed), soft)
    assert torch.isfinite(loss)
    _trainer(tmp_path, max_epochs=1).fit(module, TinyData(8))


def test_network_without_classes_is_rejected():
    with pytest.raises(ValueError, match=r"TinyNet.num_classes=1: a classification network needs at least 2"):
        _module(net=TinyNet(num_classes=1))


def test_non_finite_loss_stops_with_clear_error(tmp_path):
    trainer = _trainer(tmp_path, callbacks=[StopOnNonFiniteLoss()])
    with pytest.raises(NonFiniteError, match=r"train/loss became nan at step \d+ \(epoch 0\); training stopped"):
        trainer.fit(_module(net=TinyNet(poison=True)), TinyData(8))


class PoisonAtStep(L.Callback):
    """Turns the network's output to NaN from training step ``step`` on (counted from 0)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.net.poison = trainer.global_step >= self.step


@pytest.mark.parametrize("poisoned_step", [3, 7])
def test_a_non_finite_loss_never_reaches_a_checkpoint_or_another_step(tmp_path, poisoned_step):
    """The loss is read when the next step starts or before validation and checkpoints (never at the end
    of its own step, which would stall a GPU): step 7 is the last of epoch 0, step 3 one in its middle."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    steps = []
    trace = L.Callback()
    trace.on_train_batch_start = lambda trainer, *args: steps.append(trainer.global_step)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    trainer = _trainer(
        tmp_path,
        enable_checkpointing=True,
        callbacks=[PoisonAtStep(poisoned_step), trace, StopOnNonFiniteLoss(), checkpoints],
    )
    with pytest.raises(NonFiniteError, match=rf"train/loss became nan at step {poisoned_step} \(epoch 0\)"):
        trainer.fit(_module(), TinyData(8))
    assert max(steps) <= poisoned_step + 1  # the step after the NaN never ran its forward pass
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))  # epoch 0 never ended: nothing was saved


def test_progress_bar_reads_training_metrics_at_the_logging_interval(tmp_path, monkeypatch):
    """Each read waits for the GPU; the bar reads every 4th step here (16 steps), and shows the loss."""
    from lightning.pytorch.callbacks import RichProgressBar

    from das_lab.callbacks.progress import ProgressBar

    reads = []
    original = RichProgressBar.get_metrics

    def counted(self, trainer, pl_module):
        if trainer.training:
            reads.append(trainer.global_step)
        return original(self, trainer, pl_module)

    monkeypatch.setattr(RichProgressBar, "get_metrics", counted)
    bar = ProgressBar(metrics_every_n_steps=4)
    trainer = _trainer(tmp_path, max_epochs=2, enable_progress_bar=True, callbacks=[bar], limit_val_batches=0)
    trainer.fit(_module(), TinyData(8))
    assert trainer.global_step == 16
    assert reads == [1, 5, 9, 13]  # after steps 1, 5, 9, 13: not after the other 12 (stock bar: all 16)
    assert "train/loss_step" in bar.get_metrics(trainer, trainer.lightning_module)
    with pytest.raises(ValueError, match="metrics_every_n_steps=0"):
        ProgressBar(metrics_every_n_steps=0)
