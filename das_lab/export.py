"""``das-lab export``: a checkpoint as a timm/Hugging Face folder or an ONNX model, each checked right after writing."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from das_lab.command import Outcome, Run, run_command
from das_lab.errors import ConfigError
from das_lab.hub import check_repo_id, push_folder
from das_lab.model_card import model_card
from das_lab.pipeline import Restored, restore_checkpoint
from das_lab.tasks.base import ImageInputs, require_data

log = logging.getLogger(__name__)

FORMATS = ("timm", "onnx")
ONNX_FILE = "model.onnx"


def check_out_dir(out: str, overwrite: bool) -> Path:
    """The export folder; a new export never mixes into an existing non-empty folder unless ``overwrite``."""
    path = Path(out).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out={out} is a file; give a folder for the export")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"out={out} exists and is not empty; choose a new folder or pass overwrite=true")
    return path


def empty_out_dir(path: Path) -> None:
    """Create the export folder, clearing what an earlier export left (only reached with overwrite=true)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def load_exportable(ckpt_path: str, format: str) -> tuple[nn.Module, tuple[int, ...], Restored, Optional[ImageInputs]]:
    """The network to export (eval mode), its input size (C, H, W), what restored it, and for classifiers
    their datamodule: classifiers go to timm folders and ONNX, segmentors (logits at the input's size) to ONNX."""
    from das_lab.tasks.classification import ClassificationModule
    from das_lab.tasks.segmentation import SegmentationModule

    restored = restore_checkpoint(ckpt_path)
    module = restored.module
    if isinstance(module, SegmentationModule) and format == "onnx":
        return module.segmentor.eval(), (3, module.crop_size, module.crop_size), restored, None
    if not isinstance(module, ClassificationModule):
        raise ConfigError(
            f"{ckpt_path} holds a {type(module).__name__}; das-lab export takes classification models "
            f"(format=timm or onnx) and segmentation models (format=onnx)"
        )
    datamodule = require_data(instantiate(restored.data), ImageInputs, "das-lab export")
    return restored.net.eval(), tuple(datamodule.eval_data_config()["input_size"]), restored, datamodule


def sample_batch(input_size: Sequence[int], batch: int, seed: int = 0) -> torch.Tensor:
    """A fixed random batch at the model's input size, for checking an export against PyTorch."""
    return torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed))


def write_timm_folder(net: nn.Module, datamodule: Any, label_names: list[str], out_dir: Path) -> dict[str, Any]:
    """model.safetensors + config.json in timm's hub format; returns the pretrained_cfg written."""
    from timm.models import save_for_hf

    # the config's lists arrive as OmegaConf containers: config.json needs plain values
    model_args = {
        key: OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
        for key, value in getattr(net, "_model_args", {}).items()
    }
    save_for_hf(
        net,
        str(out_dir),
        model_config={"label_names": label_names},
        model_args=model_args,
        data_config=datamodule.eval_data_config(),
        safe_serialization=True,
    )
    return json.loads((out_dir / "config.json").read_text())["pretrained_cfg"]


def check_timm_folder(net: nn.Module, out_dir: Path, inputs: torch.Tensor) -> float:
    """Rebuild the folder through ``timm.create_model('local-dir:...')``: weights must be equal; returns max |diff|."""
    import timm

    import das_lab.models  # noqa: F401  (the architecture must be registered)

    loaded = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
    expected, got = net.state_dict(), loaded.state_dict()
    differing = [key for key in expected if key not in got or not torch.equal(expected[key], got[key])]
    if differing or set(got) - set(expected):
        raise RuntimeError(f"export check failed: {out_dir} loads with different weights ({differing[:5]} ...)")
    with torch.no_grad():
        return float((net(inputs) - loaded(inputs)).abs().max())


def write_onnx(net: nn.Module, inputs: torch.Tensor, path: Path, opset: int) -> None:
    """ONNX through torch's dynamo exporter, batch axis dynamic (DeformConv needs opset 19)."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        net,
        (inputs,),
        dynamo=True,
        opset_version=opset,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    program.save(str(path))


def check_onnx(net: nn.Module, path: Path, inputs: torch.Tensor, atol: float) -> float:
    """Run the ONNX file in onnxruntime on ``inputs``; fail when it differs from PyTorch by more than ``atol``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    with torch.no_grad():
        diff = float((torch.from_numpy(logits) - net(inputs)).abs().max())
    if not diff <= atol:
        raise RuntimeError(f"ONNX check failed: onnxruntime differs from PyTorch by {diff:.3g} > onnx_atol={atol}")
    return diff


def export(cfg: DictConfig, run: Run) -> Outcome:
    """Write ``cfg.ckpt_path`` as ``cfg.format`` into ``cfg.out``; returns the max |diff| of the check."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format}: unknown export format; choose from {', '.join(FORMATS)}")
    if cfg.push_to_hub:
        if cfg.format != "timm":
            raise ConfigError(
                f"push_to_hub uploads timm folders; drop push_to_hub or export with format=timm "
                f"(not format={cfg.format})"
            )
        check_repo_id(cfg.push_to_hub)
    if cfg.format == "onnx":
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as error:
            raise ConfigError(
                f"format=onnx needs the export extra ({error.name} missing): pip install 'das-lab[export]'"
            ) from error
    out_dir = check_out_dir(cfg.out, cfg.overwrite)
    net, input_size, restored, datamodule = load_exportable(cfg.ckpt_path, cfg.format)
    run.start()
    empty_out_dir(out_dir)
    if cfg.format == "timm":
        pretrained_cfg = write_timm_folder(net, datamodule, restored.class_names(net.num_classes), out_dir)
        card = model_card(
            out_dir,
            net.pretrained_cfg["architecture"],
            pretrained_cfg,
            OmegaConf.to_container(restored.data, resolve=True),
            cfg.ckpt_path,
        )
        (out_dir / "README.md").write_text(card)
        diff = check_timm_folder(net, out_dir, sample_batch(input_size, 2))
        print(f"timm folder {out_dir}: weights equal, max |diff| of outputs {diff:.3g}")
        if cfg.push_to_hub:
            print(f"uploaded to the Hub: {push_folder(out_dir, cfg.push_to_hub, cfg.private)}")
        return Outcome(objective=diff)
    write_onnx(net, sample_batch(input_size, 2), out_dir / ONNX_FILE, cfg.opset)
    diff = check_onnx(net, out_dir / ONNX_FILE, sample_batch(input_size, 3, seed=1), cfg.onnx_atol)
    print(f"ONNX {out_dir / ONNX_FILE}: onnxruntime vs PyTorch max |diff| {diff:.3g} (batch of 3)")
    return Outcome(objective=diff)


def main(args: Sequence[str]) -> int:
    """``das-lab export ckpt_path=PATH format=timm|onnx out=DIR [overwrite=true] [push_to_hub=ORG/NAME]``."""
    return run_command(export, "export", "export", list(args))
