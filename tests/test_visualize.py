"""Attention figures: DAS gate maps and DAT++ sampling points, from the callback and ``das-lab visualize``."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from cli_helpers import TINY, read_metrics, run_cli, run_dirs
from das_lab.callbacks import AttentionVisualizer
from das_lab.models.das import capture_gate_maps
from das_lab.models.das_resnet import DASResNet
from das_lab.models.dat import DAT
from das_lab.plots import _gate_maps, _to_pixels, attention_figures, can_draw, save_figures
from das_lab.visualize import main as visualize_main

# one training and one validation step per job, no test
FAST = [*TINY, "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "test=false"]

TINY_RESNET = dict(num_classes=10, block="basic", layers=[1, 1, 1, 1], channels=[16, 32, 64, 128], stem_width=16)


def _dat_nano(**changes) -> DAT:
    args = dict(
        img_size=64,
        num_classes=10,
        dim_stem=16,
        dims=[16, 32, 64, 128],
        depths=[2, 2, 2, 1],
        heads=[1, 2, 2, 4],
        stage_spec=[["N", "D"], ["N", "D"], ["N", "D"], ["D"]],
        groups=[1, 1, 1, 2],
        strides=[4, 2, 1, 1],
    )
    return DAT(**{**args, **changes})


def test_gate_maps_are_channel_means_upsampled_to_the_image():
    torch.manual_seed(0)
    net = DASResNet(**TINY_RESNET, gate_stages=[2, 3]).eval()
    image = torch.randn(1, 3, 32, 32)
    maps = _gate_maps(net, image)
    assert sorted(maps) == ["stage_gates.2", "stage_gates.3"]
    with torch.no_grad(), capture_gate_maps(net) as raw:
        net(image)
    expected = F.interpolate(raw["stage_gates.3"].gate.mean(1, keepdim=True), size=(32, 32), mode="bilinear")[0, 0]
    assert maps["stage_gates.3"].shape == (32, 32)
    np.testing.assert_allclose(maps["stage_gates.3"], expected.numpy(), rtol=1e-6)
    assert 0 <= maps["stage_gates.2"].min() and maps["stage_gates.2"].max() <= 1


def test_das_figures_show_each_gate(tmp_path):
    net = DASResNet(**TINY_RESNET, gate_stages=[1, 2, 3])
    net.train()
    figures = attention_figures(net, [torch.randn(3, 32, 32), torch.randn(3, 40, 24)], ["a", "b"])
    assert [name for name, _ in figures] == ["0_gates", "1_gates"]
    assert len(figures[0][1].axes) == 1 + 3 + 3  # image, three overlays, three colour bars
    assert net.training  # the network's mode is restored
    paths = save_figures(figures, tmp_path / "out")
    assert [p.name for p in paths] == ["0_gates.png", "1_gates.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_sampling_points_map_to_image_pixels():
    corners = torch.tensor([[[[-1.0, -1.0], [1.0, 1.0]]]])  # (G=1, Hk=1, Wk=2, (y, x))
    pixels = _to_pixels(corners, feature_size=(4, 4), image_size=(32, 32))
    # feature cell 0 is centred on image pixel 3.5, cell 3 on 27.5 (stride 8)
    np.testing.assert_allclose(pixels, [[[3.5, 3.5], [27.5, 27.5]]])


def test_dat_figures_draw_each_deformable_block_and_no_offsets_sit_on_the_grid():
    net = _dat_nano(no_offs=[True, True, True, True])
    figures = attention_figures(net, [torch.randn(3, 64, 64)], ["digit"])
    ((name, figure),) = figures
    assert name == "0_sampling"
    panels = figure.axes[1:]
    titles = [ax.get_title() for ax in panels]
    assert titles == ["stage 1 block 1", "stage 2 block 1", "stage 3 block 1", "stage 4 block 0"]
    sampled, grid = panels[0].collections[0].get_offsets(), panels[0].collections[1].get_offsets()
    assert len(grid) == 16  # stage 1: 16x16 map, offset stride 4 -> 4x4 reference points
    np.testing.assert_allclose(sampled, grid, atol=1e-5)  # without offsets keys are sampled at the references
    deformed = attention_figures(_dat_nano(), [torch.randn(3, 64, 64)], ["digit"])[0][1]
    assert len(deformed.axes) == 5


def _fake_trainer(tmp_path: Path, epoch: int, loggers: list) -> SimpleNamespace:
    images = torch.randn(6, 3, 32, 32)
    loader = DataLoader(TensorDataset(images, torch.arange(6) % 3), batch_size=4)
    return SimpleNamespace(
        sanity_checking=False,
        is_global_zero=True,
        current_epoch=epoch,
        val_dataloaders=loader,
        datamodule=SimpleNamespace(class_names=["cat", "dog", "fox"]),
        default_root_dir=str(tmp_path),
        loggers=loggers,
        global_step=7,
    )


def test_callback_saves_every_n_epochs_and_logs_to_tensorboard(tmp_path):
    module = SimpleNamespace(net=DASResNet(**TINY_RESNET, gate_stages=[2]))
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb", version="")
    callback = AttentionVisualizer(every_n_epochs=2, num_images=2)
    callback.on_validation_epoch_end(_fake_trainer(tmp_path, 0, [tensorboard]), module)
    assert not (tmp_path / "visualizations").exists()
    callback.on_validation_epoch_end(_fake_trainer(tmp_path, 1, [tensorboard]), module)
    folder = tmp_path / "visualizations" / "epoch_001"
    assert sorted(p.name for p in folder.iterdir()) == ["0_gates.png", "1_gates.png"]
    assert callback._titles == ["val 0: cat", "val 1: dog"]
    tensorboard.experiment.flush()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_callback_on_plain_resnet_says_so_once(tmp_path, caplog):
    module = SimpleNamespace(net=DASResNet(**TINY_RESNET))
    assert not can_draw(module.net)
    callback = AttentionVisualizer(num_images=2)
    with caplog.at_level(logging.INFO, logger="das_lab.callbacks.visualize"):
        for epoch in range(3):
            callback.on_validation_epoch_end(_fake_trainer(tmp_path, epoch, []), module)
    assert [r.message for r in caplog.records] == [
        "callbacks.visualize: DASResNet has no DAS gates or deformable sampling; nothing to draw"
    ]
    assert not (tmp_path / "visualizations").exists()


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="every_n_epochs=0 and num_images=4 must be >= 1"):
        AttentionVisualizer(every_n_epochs=0)


@pytest.mark.slow
def test_visualize_command_on_any_images(tmp_path):
    result = run_cli(["train", *FAST], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = read_metrics(run_dirs(tmp_path)[0])["ckpt_best"]
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    gray = np.random.default_rng(1).integers(0, 255, (20, 20), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "b.jpg")

    shown = run_cli(["visualize", f"ckpt_path={ckpt}", "images=[a.png,b.jpg]", "out_dir=figs"], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["0_gates.png", "1_gates.png"]
    assert str(tmp_path / "figs" / "0_gates.png") in shown.stdout


def test_visualize_names_missing_images(tmp_path, capsys):
    status = visualize_main(["ckpt_path=model.ckpt", "images=[nowhere.png,a.png]", f"hydra.run.dir={tmp_path / 'run'}"])
    assert status == 2
    assert "das-lab: error: images not found: nowhere.png, a.png" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # an input error leaves no run folder behind
