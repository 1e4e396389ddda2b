"""``das-lab predict``: label one's own images with a checkpoint or an exported timm folder, into a CSV."""

from __future__ import annotations

import glob
import logging
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from das_lab.command import Outcome, Run, run_command
from das_lab.data.decode import CorruptImageError, read_rgb
from das_lab.errors import ConfigError
from das_lab.utils.tables import write_csv

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
    """Image files decoded and transformed; an unreadable file yields ``None`` instead of stopping the run."""

    def __init__(self, paths: Sequence[Path], transform: Transform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Optional[Tensor]]:
        try:
            return index, self.transform(read_rgb(self.paths[index]))
        except CorruptImageError:
            return index, None


def collate_readable(items: list[tuple[int, Optional[Tensor]]]) -> tuple[list[int], Optional[Tensor], list[int]]:
    """Indices and stacked images of the readable files of a batch, and the indices of the unreadable ones."""
    readable = [(index, image) for index, image in items if image is not None]
    unreadable = [index for index, image in items if image is None]
    images = torch.stack([image for _, image in readable]) if readable else None
    return [index for index, _ in readable], images, unreadable


def from_checkpoint(ckpt_path: str) -> tuple[nn.Module, Transform, list[str]]:
    """Network, the eval transform of its datamodule, and class names of a das-lab checkpoint."""
    from das_lab.export import load_classifier

    net, datamodule, _ = load_classifier(ckpt_path)
    return net, datamodule.eval_transform, list(datamodule.class_names)


def from_export(folder: str) -> tuple[nn.Module, Transform, list[str]]:
    """Network, eval transform (from its pretrained_cfg) and label names of a ``das-lab export format=timm`` folder."""
    import timm

    import das_lab.models  # noqa: F401  (the architecture must be registered)
    from das_lab.data.transforms import build_eval_transform

    if not (Path(folder).expanduser() / "config.json").is_file():
        raise ConfigError(
            f"export={folder} has no config.json: give a folder written by das-lab export format=timm"
        )
    net = timm.create_model(f"local-dir:{Path(folder).expanduser()}", pretrained=True).eval()
    cfg = net.pretrained_cfg
    transform = build_eval_transform(
        cfg["input_size"][-1], cfg["crop_pct"], cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"])
    )
    return net, transform, list(cfg.get("label_names") or [])


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; any other value is a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def predict(cfg: DictConfig, run: Run) -> Outcome:
    """Write the top-k classes of every readable file of ``cfg.inputs`` to a CSV; list the unreadable ones."""
    if bool(cfg.ckpt_path) == bool(cfg.export):
        raise ConfigError("give exactly one model: ckpt_path=PATH (a das-lab checkpoint) or export=DIR (a timm folder)")
    files = list_inputs(str(cfg.inputs))
    net, transform, names = from_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else from_export(cfg.export)
    run.start()
    device = pick_device(cfg.device)
    net = net.to(device).eval()
    num_classes = net.num_classes
    names = names if len(names) == num_classes else [f"class_{i}" for i in range(num_classes)]
    k = min(cfg.topk, num_classes)
    loader = DataLoader(ImageFiles(files, transform), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        collate_fn=collate_readable)
    out = Path(cfg.out or run.dir / "predictions.csv").expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    unreadable: list[Path] = []

    def rows() -> Iterator[list[str]]:
        for indices, images, bad in tqdm(loader, desc="predict", unit="batch", file=sys.stderr):
            unreadable.extend(files[i] for i in bad)
            if images is None:
                continue
            probs, classes = net(images.to(device)).float().softmax(-1).topk(k, dim=-1)
            for index, p_row, c_row in zip(indices, probs.tolist(), classes.tolist()):
                yield [str(files[index]), *(v for c, p in zip(c_row, p_row) for v in (names[c], f"{p:.6f}"))]

    header = ["file", *(f"{column}_{rank}" for rank in range(1, k + 1) for column in ("class", "prob"))]
    with torch.no_grad():
        write_csv(out, header, rows())
    print(f"{len(files) - len(unreadable)} image(s) labelled: {out}")
    if unreadable:
        print(f"{len(unreadable)} unreadable file(s) skipped:", *unreadable, sep="\n  ", file=sys.stderr)
    return Outcome()


def main(args: Sequence[str]) -> int:
    """``das-lab predict ckpt_path=PATH|export=DIR inputs=DIR|FILE|GLOB [out=FILE]``."""
    return run_command(predict, "predict", "predict", list(args))

