"""``das-lab predict``: one's own images through a checkpoint (classification, detection, segmentation) or an
exported timm folder; the outputs are written by das_lab.predictions."""

from __future__ import annotations

import glob
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from das_lab.command import Outcome, Run, run_command
from das_lab.data.decode import CorruptImageError, read_rgb
from das_lab.errors import ConfigError
from das_lab.pipeline import index_names
from das_lab.predictions import ClassesCSV, DetectionsJSON, LabelPNGs
from das_lab.tasks.detection import DetectionModule
from das_lab.tasks.segmentation import SegmentationModule

log = logging.getLogger(__name__)

Transform = Callable[[Tensor], Tensor]


def list_inputs(spec: str) -> list[Path]:
    """The files named by ``inputs``: every file of a folder (recursively), one file, or a glob's matches."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    if not files:
        raise ConfigError(
            f"inputs={spec}: no files found; give a folder of images, an image file or a glob ('photos/*.jpg')"
        )
    return sorted(files)


class ImageFiles(Dataset):
    """Image files decoded (uint8 RGB) and transformed; an unreadable file yields ``None`` instead of stopping the run."""

    def __init__(self, paths: Sequence[Path], transform: Optional[Transform]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Optional[Tensor]]:
        try:
            image = read_rgb(self.paths[index])
            return index, image if self.transform is None else self.transform(image)
        except CorruptImageError:
            return index, None


def collate_readable(items: list[tuple[int, Optional[Tensor]]]) -> tuple[list[int], list[Tensor], list[int]]:
    """Indices and images of the readable files of a batch, and the indices of the unreadable ones."""
    readable = [(index, image) for index, image in items if image is not None]
    unreadable = [index for index, image in items if image is None]
    return [index for index, _ in readable], [image for _, image in readable], unreadable


def output_names(files: Sequence[Path]) -> dict[Path, Path]:
    """Per input, the name of its output PNG in an output folder: its path below the inputs' common folder."""
    root = Path(os.path.commonpath([str(path.parent.absolute()) for path in files]))
    names = {path: path.absolute().relative_to(root).with_suffix(".png") for path in files}
    clashing = sorted(str(name) for name, count in Counter(names.values()).items() if count > 1)
    if clashing:
        raise ConfigError(
            f"inputs: several files would be written as {clashing[0]} (they differ only in their "
            "suffix); give inputs a glob that picks one of them, e.g. inputs='photos/*.jpg'"
        )
    return names


class Writer(Protocol):
    """Turns batches of model inputs into a task's output files."""

    def __call__(self, files: Sequence[Path], images: list[Tensor]) -> None: ...

    def finish(self) -> Path: ...


def from_export(folder: str) -> tuple[nn.Module, Transform, list[str]]:
    """Network, eval transform (from its pretrained_cfg) and label names of a ``das-lab export format=timm`` folder."""
    import timm

    import das_lab.models  # noqa: F401  (the architecture must be registered)
    from das_lab.data.transforms import build_eval_transform

    if not (Path(folder).expanduser() / "config.json").is_file():
        raise ConfigError(f"export={folder} has no config.json: give a folder written by das-lab export format=timm")
    net = timm.create_model(f"local-dir:{Path(folder).expanduser()}", pretrained=True).eval()
    cfg = net.pretrained_cfg
    transform = build_eval_transform(
        cfg["input_size"][-1], cfg["crop_pct"], cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"])
    )
    names = list(cfg.get("label_names") or [])
    if len(names) != net.num_classes:
        log.warning("export=%s names no classes: they are named class_0 ... class_%d", folder, net.num_classes - 1)
        names = index_names(net.num_classes)
    return net, transform, names


def writer_for_checkpoint(
    cfg: DictConfig, run: Run, files: Sequence[Path]
) -> tuple[Writer, Optional[Transform], nn.Module]:
    """The writer of the checkpoint's task, the transform its inputs need and the model to move to the device."""
    from hydra.utils import instantiate

    from das_lab.data.ade20k import normalize
    from das_lab.pipeline import restore_checkpoint
    from das_lab.tasks.classification import ClassificationModule
    from das_lab.visualize import eval_transform

    restored = restore_checkpoint(cfg.ckpt_path)
    module = restored.module.eval()
    if cfg.boxes_dir and not isinstance(module, DetectionModule):
        raise ConfigError(
            f"boxes_dir={cfg.boxes_dir}: boxes are drawn for detection checkpoints; "
            f"{cfg.ckpt_path} holds a {type(module).__name__}, drop boxes_dir"
        )
    if isinstance(module, ClassificationModule):
        names = restored.class_names(restored.net.num_classes)
        writer: Writer = ClassesCSV(restored.net, names, cfg.topk, out_path(cfg, run, "predictions.csv"))
        return writer, eval_transform(instantiate(restored.data)), restored.net
    if isinstance(module, DetectionModule):
        names = restored.class_names(module.num_classes)
        ids = (restored.classes or {}).get("category_ids") or list(range(1, module.num_classes + 1))
        boxes = None
        if cfg.boxes_dir:
            folder = Path(cfg.boxes_dir).expanduser().absolute()
            boxes = {path: folder / name for path, name in output_names(files).items()}
        writer = DetectionsJSON(module, names, ids, out_path(cfg, run, "detections.json"), boxes, cfg.box_threshold)
        return writer, None, module
    if isinstance(module, SegmentationModule):
        names = restored.class_names(module.num_classes)
        folder = out_path(cfg, run, "predictions")
        labels = {path: folder / name for path, name in output_names(files).items()}
        return LabelPNGs(module, names, folder, labels), normalize, module
    raise ConfigError(
        f"{cfg.ckpt_path} holds a {type(module).__name__}; das-lab predict takes classification, "
        "detection and segmentation checkpoints"
    )


def out_path(cfg: DictConfig, run: Run, default: str) -> Path:
    """``cfg.out``, or ``default`` inside the run folder."""
    return Path(cfg.out or run.dir / default).expanduser().absolute()


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; any other value is a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def predict(cfg: DictConfig, run: Run) -> Outcome:
    """Write the task's predictions for every readable file of ``cfg.inputs``; list the unreadable ones."""
    if bool(cfg.ckpt_path) == bool(cfg.export):
        raise ConfigError("give exactly one model: ckpt_path=PATH (a das-lab checkpoint) or export=DIR (a timm folder)")
    files = list_inputs(str(cfg.inputs))
    transform: Optional[Transform]
    if cfg.export:
        if cfg.boxes_dir:
            raise ConfigError(
                f"boxes_dir={cfg.boxes_dir}: boxes are drawn for detection checkpoints, and export={cfg.export} "
                "is a classifier; drop boxes_dir"
            )
        model, transform, names = from_export(cfg.export)
        writer: Writer = ClassesCSV(model, names, cfg.topk, out_path(cfg, run, "predictions.csv"))
    else:
        writer, transform, model = writer_for_checkpoint(cfg, run, files)
    run.start()
    device = pick_device(cfg.device)
    model.to(device).eval()
    loader = DataLoader(
        ImageFiles(files, transform),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=collate_readable,
    )
    unreadable: list[Path] = []
    with torch.no_grad():
        for indices, images, bad in tqdm(loader, desc="predict", unit="batch", file=sys.stderr):
            unreadable += [files[i] for i in bad]
            if images:
                writer([files[i] for i in indices], [image.to(device) for image in images])
    written = writer.finish()
    print(f"{len(files) - len(unreadable)} image(s) labelled: {written}")
    if unreadable:
        print(f"{len(unreadable)} unreadable file(s) skipped:", *unreadable, sep="\n  ", file=sys.stderr)
    return Outcome()


def main(args: Sequence[str]) -> int:
    """``das-lab predict ckpt_path=PATH|export=DIR inputs=DIR|FILE|GLOB [out=PATH] [boxes_dir=DIR]``."""
    return run_command(predict, "predict", "predict", list(args))
