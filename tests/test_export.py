"""``das-lab export``: a timm folder that loads back with the checkpoint's weights, ONNX checked in onnxruntime."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import onnxruntime
import pytest
import timm
import torch

from cli_helpers import error_line, read_metrics, run_cli, run_dirs
from das_lab.export import check_onnx, check_out_dir, empty_out_dir, sample_batch, write_onnx
from das_lab.export import main as export_main
from das_lab.pipeline import restore_checkpoint


@pytest.fixture(scope="module")
def trained(tiny_checkpoint) -> tuple[Path, str]:
    """The shared tiny digits checkpoint (conftest.py): (its working folder, its best checkpoint)."""
    return tiny_checkpoint


@pytest.mark.slow
def test_timm_folder_loads_with_the_checkpoints_weights_and_a_model_card(trained):
    root, ckpt = trained
    result = run_cli(["export", f"ckpt_path={ckpt}", "format=timm", "out=hub"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights equal" in result.stdout
    folder = root / "hub"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "das_resnet_tiny"
    assert config["num_classes"] == 10
    assert config["label_names"] == [str(d) for d in range(10)]
    pretrained_cfg = config["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [3, 32, 32]
    assert pretrained_cfg["mean"] == [0.1] * 3 and pretrained_cfg["std"] == [0.25] * 3
    assert pretrained_cfg["crop_pct"] == 1.0 and pretrained_cfg["interpolation"] == "bilinear"

    net = restore_checkpoint(ckpt).net
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert loaded.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(value, net.state_dict()[key]) for key, value in loaded.state_dict().items())
    images = sample_batch((3, 32, 32), 4)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), net.eval()(images))

    card = (folder / "README.md").read_text()
    metrics = read_metrics(run_dirs(root)[0])
    assert re.search(rf"\| acc1 +\| test +\| {metrics['final']['test/acc1']:.4f} +\|", card)
    assert f"parameters: {metrics['params']}" in card
    assert "das-lab version: 0.1.0" in card and "git commit:" in card
    assert "das-lab train data.image_size=32" in card
    assert "arXiv:2311.12091" in card and "DigitsDataModule" in card and "max_epochs: 1" in card


@pytest.mark.slow
def test_onnx_export_has_a_dynamic_batch_and_deformconv_and_matches_pytorch(trained):
    root, ckpt = trained
    result = run_cli(["export", f"ckpt_path={ckpt}", "format=onnx", "out=onnx"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "onnxruntime vs PyTorch max |diff|" in result.stdout
    path = root / "onnx" / "model.onnx"
    assert "DeformConv" in {node.op_type for node in onnx.load(str(path)).graph.node}

    net = restore_checkpoint(ckpt).net
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = sample_batch((3, 32, 32), 5, seed=7)
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(logits) - net.eval()(images)).abs().max() < 1e-4
        net.fc.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="onnxruntime differs from PyTorch by 1 > onnx_atol=0.0001"):
        check_onnx(net, path, images, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "args", "size"),
    [
        ("das_mobilenet_v2", dict(width_mult=0.25), 32),
        # one neighbourhood and one deformable block first, then deformable blocks only: every DAT++ block type
        ("dat_nano", dict(drop_path_rate=0.0, depths=[2, 1, 1, 1], stage_spec=[["N", "D"], ["D"], ["D"], ["D"]]), 64),
    ],
)
def test_onnx_export_of_mobilenet_and_dat_matches_pytorch(tmp_path, name, args, size):
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=10, **args).eval()
    write_onnx(net, sample_batch((3, size, size), 2), tmp_path / "model.onnx", opset=19)
    assert check_onnx(net, tmp_path / "model.onnx", sample_batch((3, size, size), 3, seed=1), atol=1e-4) < 1e-4


def test_bad_input_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    line = error_line(export_main, [f"ckpt_path={foreign}", f"out={tmp_path / 'a'}"], run, capsys)
    assert line.startswith("das-lab: error: ") and "it was not written by `das-lab train`" in line

    line = error_line(export_main, [f"ckpt_path={foreign}", "format=tflite", f"out={tmp_path / 'b'}"], run, capsys)
    assert line == "das-lab: error: format=tflite: unknown export format; choose from timm, onnx"

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    line = error_line(export_main, [f"ckpt_path={foreign}", f"out={tmp_path / 'full'}"], run, capsys)
    full = tmp_path / "full"
    assert line == f"das-lab: error: out={full} exists and is not empty; choose a new folder or pass overwrite=true"
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_overwrite_empties_the_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.onnx").write_text("stale")
    out = check_out_dir(str(tmp_path / "out"), overwrite=True)
    assert out == tmp_path / "out" and (out / "old.onnx").exists()
    empty_out_dir(out)
    assert out.is_dir() and list(out.iterdir()) == []
