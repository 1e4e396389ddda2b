"""One-call GPU check of das-lab's speed: prints a table and writes the figures as JSON.

Usage: python benchmarks/gpu_check.py [--device auto|cuda|cpu] [--quick] [--precision fp32|bf16|fp16]
       [--workers N] [--compile-backend inductor] [--out gpu_check.json]

Four checks, each in one process except the last, each timed after warm-up:
1. train step of DAS-ResNet-50 against the same ResNet-50 without gates (bf16 autocast on GPUs,
   channels-last, batch 128 at 224; models timed in turn): the ratio's goal is <= 1.15;
2. DAT-T++ training img/s and peak memory: reference attention kernels, fused kernels (SDPA and
   flex_attention, ``model.attn_impl=fused``; on CPU flex_attention's forward with das-lab's banded
   backward, as torch has no flex_attention backward there)
   and ``torch.compile``d with the default kernels (as ``task.compile``);
3. das-lab's Lightning loop (``ClassificationModule`` + ``lightning.Trainer``) against a plain PyTorch
   loop with the same network, optimizer, loss, precision and in-memory batches: the time ratio's
   goal is <= 1.05 (rounds alternate between the two loops);
4. ``das-lab train`` end to end on a generated ImageNet-format JPEG folder (500x375 images,
   ``data=imagenet``), once normalising in the loader workers and once on the device after transfer
   (``data.normalize_on``): training img/s and the fraction of the training loop the accelerator waits
   for the data loader (steps are synchronised; near 0: compute-bound, large: loader-bound). The
   generated images are solid colours (tests/fake_datasets.py), which decode faster than photos, so
   the real loader share is higher than measured.

Under 8 minutes on one GPU. ``--device cpu --quick`` runs the same code at toy sizes (ResNet-50s at
64 px, DAT nano at 64 px, the tiny DAS-ResNet end to end) in a few minutes.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from train_step import interleaved_seconds, train_step

import das_lab.models  # noqa: F401  (registers das-lab's backbones in timm)
from das_lab.tasks.classification import ClassificationModule
from das_lab.tasks.speed import apply_speed_options
from das_lab.utils.tables import markdown_table, measured
from das_lab.utils.timing import autocast, peak_memory_mib, resolve_device, synchronize

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent / "tests"))
from fake_datasets import IMAGENET_WNIDS, write_image  # noqa: E402  (the tests' ImageNet-format writer)

LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
JPEG_SIZE = (500, 375)  # width, height: a typical ImageNet photo


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run of the checks."""

    batch: int
    image: int
    warmup: int
    repeats: int
    dat_model: str
    dat_batch: int
    dat_image: int
    loop_model: str
    loop_steps: int
    loop_rounds: int
    e2e_model: str
    e2e_images_per_class: int


FULL = Sizes(
    batch=128,
    image=224,
    warmup=3,
    repeats=10,
    dat_model="dat_tiny",
    dat_batch=64,
    dat_image=224,
    loop_model="das_resnet50",
    loop_steps=30,
    loop_rounds=3,
    e2e_model="das_resnet50",
    e2e_images_per_class=1000,
)
QUICK = Sizes(
    batch=2,
    image=64,
    warmup=1,
    repeats=3,
    dat_model="dat_nano",
    dat_batch=4,
    dat_image=64,
    loop_model="das_resnet_tiny",
    loop_steps=12,
    loop_rounds=5,
    e2e_model="das_resnet_tiny",
    e2e_images_per_class=48,
)


# ----------------------------------------------------------------------------- 1. DAS-ResNet-50 vs ResNet-50


def check_train_step_ratio(device: torch.device, sizes: Sizes, precision: str) -> dict[str, Any]:
    """Train-step time of das_resnet50 over the same ResNet-50 without gates (channels-last)."""
    names = ("daslab_resnet50", "das_resnet50")
    steps = {name: train_step(name, sizes.batch, sizes.image, device, precision, channels_last=True) for name in names}
    seconds = interleaved_seconds(steps, device, sizes.warmup, sizes.repeats)
    return {
        "batch": sizes.batch,
        "image": sizes.image,
        "precision": precision,
        "channels_last": True,
        "resnet50_ms": 1000 * seconds[names[0]],
        "das_resnet50_ms": 1000 * seconds[names[1]],
        "ratio": seconds[names[1]] / seconds[names[0]],
        "goal": 1.15,
    }


# ----------------------------------------------------------------------------- 2. DAT-T++ paths


# path -> (model.attn_impl, task.compile)
DAT_PATHS = {"reference": ("reference", False), "fused": ("fused", False), "compiled": ("auto", True)}


def check_dat_paths(device: torch.device, sizes: Sizes, precision: str, compile_backend: str) -> dict[str, Any]:
    """Training img/s and peak memory of DAT++ on its reference kernels, fused kernels, and compiled (auto kernels)."""
    results: dict[str, Any] = {
        "model": sizes.dat_model,
        "batch": sizes.dat_batch,
        "image": sizes.dat_image,
        "precision": precision,
        "compile_backend": compile_backend,
    }
    for path, (attn_impl, compiled) in DAT_PATHS.items():
        torch.manual_seed(0)
        step = train_step(
            sizes.dat_model,
            sizes.dat_batch,
            sizes.dat_image,
            device,
            precision,
            False,
            compiled,
            compile_backend,
            model_args={"attn_impl": attn_impl},
        )
        start = time.perf_counter()
        step()  # the first step compiles
        synchronize(device)
        first_s = time.perf_counter() - start
        seconds = interleaved_seconds({path: step}, device, sizes.warmup, sizes.repeats)[path]
        results[path] = {
            "img_s": sizes.dat_batch / seconds,
            "peak_mib": peak_memory_mib(step, device),
            "first_step_s": first_s,
        }
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------- 3. Lightning loop overhead


class StepWindow(L.Callback):
    """Seconds from the start of batch ``warmup`` to the end of the last batch (synchronised)."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup = warmup
        self.device = device
        self.start = self.end = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        synchronize(self.device)
        self.end = time.perf_counter()


def in_memory_batches(sizes: Sizes, classes: int) -> DataLoader:
    """``loop_steps`` fixed random batches held in memory, served without workers."""
    generator = torch.Generator().manual_seed(0)
    count = sizes.batch * sizes.loop_steps
    images = torch.randn(count, 3, sizes.image, sizes.image, generator=generator)
    targets = torch.randint(0, classes, (count,), generator=generator)
    return DataLoader(TensorDataset(images, targets), batch_size=sizes.batch, shuffle=False)


def plain_loop(
    net: nn.Module,
    optimizer: Callable[..., torch.optim.Optimizer],
    batches: DataLoader,
    device: torch.device,
    precision: str,
    warmup: int,
) -> float:
    """Seconds of a hand-written training loop over ``batches`` after ``warmup`` batches."""
    model = apply_speed_options(copy.deepcopy(net).to(device).train(), False, device.type == "cuda")
    opt = optimizer(model)
    start = 0.0
    for index, (images, targets) in enumerate(batches):
        if index == warmup:
            synchronize(device)
            start = time.perf_counter()
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = F.cross_entropy(model(images), targets, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    synchronize(device)
    return time.perf_counter() - start


def lightning_loop(
    net: nn.Module,
    optimizer: Callable[..., torch.optim.Optimizer],
    batches: DataLoader,
    device: torch.device,
    precision: str,
    warmup: int,
) -> float:
    """Seconds of das-lab's ClassificationModule under ``lightning.Trainer`` over the same batches."""
    module = ClassificationModule(
        copy.deepcopy(net), optimizer, label_smoothing=0.1, channels_last=device.type == "cuda"
    )
    window = StepWindow(warmup, device)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=LIGHTNING_PRECISION[precision],
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[window],
    )
    trainer.fit(module, train_dataloaders=batches)
    return window.end - window.start


def check_lightning_overhead(device: torch.device, sizes: Sizes, precision: str) -> dict[str, Any]:
    """Time ratio of das-lab's Lightning loop over a plain loop, rounds alternating between the two.

    A first round of each loop is not timed (kernel selection, allocator and thread-pool start-up
    fall on whichever loop runs first); the ratio is the median of the rounds' ratios, so that a
    burst of load on one round does not decide it.
    """
    classes = 1000
    net = timm.create_model(sizes.loop_model, num_classes=classes)
    optimizer = functools.partial(create_optimizer_v2, opt="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4)
    batches = in_memory_batches(sizes, classes)
    loops = {"plain": plain_loop, "lightning": lightning_loop}
    for loop in loops.values():
        loop(net, optimizer, batches, device, precision, sizes.warmup)
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(sizes.loop_rounds):
        for name, loop in loops.items():
            times[name].append(loop(net, optimizer, batches, device, precision, sizes.warmup))
    timed = sizes.loop_steps - sizes.warmup
    plain, lightning = (statistics.median(times[name]) for name in loops)
    ratios = [b / a for a, b in zip(*times.values())]
    return {
        "model": sizes.loop_model,
        "batch": sizes.batch,
        "image": sizes.image,
        "steps_timed": timed,
        "plain_ms_per_step": 1000 * plain / timed,
        "lightning_ms_per_step": 1000 * lightning / timed,
        "ratio": statistics.median(ratios),
        "ratio_per_round": ratios,
        "goal": 1.05,
    }


# ----------------------------------------------------------------------------- 4. das-lab train end to end


class LoaderWait(L.Callback):
    """Training img/s and the share of the loop spent waiting for batches, written to ``out`` as JSON.

    A step is timed from ``on_train_batch_start`` (its batch has arrived) to a synchronised
    ``on_train_batch_end``; the gaps between steps are waits for the data loader. The first
    ``skip`` steps (start-up, cuDNN autotuning, worker spin-up) are not counted.
    """

    def __init__(self, out: str, skip: int = 3) -> None:
        self.out = Path(out)
        self.skip = skip
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.images = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.starts.append(time.perf_counter())
        if batch_idx >= self.skip:
            self.images += len(batch[0])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        synchronize(pl_module.device)
        self.ends.append(time.perf_counter())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        starts, ends = self.starts[self.skip :], self.ends[self.skip :]
        if len(starts) < 2:
            raise RuntimeError(f"LoaderWait: {len(self.starts)} training steps, need more than {self.skip + 1}")
        loop = ends[-1] - self.ends[self.skip - 1]
        waits = sum(start - previous_end for start, previous_end in zip(starts, self.ends[self.skip - 1 :]))
        self.out.write_text(
            json.dumps(
                {
                    "steps": len(starts),
                    "images": self.images,
                    "seconds": loop,
                    "img_s": self.images / loop,
                    "loader_wait_fraction": waits / loop,
                }
            )
        )


def write_imagenet_folder(root: Path, per_class: int) -> Path:
    """An ImageNet-format folder (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) of 500x375 JPEGs."""
    for label, wnid in enumerate(IMAGENET_WNIDS):
        for n in range(per_class):
            write_image(root / "train" / wnid / f"{wnid}_{n}.JPEG", label, size=JPEG_SIZE)
        write_image(root / "val" / wnid / f"ILSVRC2012_val_{label + 1:08d}.JPEG", label, size=JPEG_SIZE)
    return root


NORMALIZE_ON = ("workers", "device")


def check_end_to_end(device: torch.device, sizes: Sizes, precision: str, workers: int) -> dict[str, Any]:
    """``das-lab train`` for one epoch on generated JPEGs, normalising in the workers and on the device
    (``data.normalize_on``, one run each on the same folder): img/s and the loader-wait fraction."""
    with tempfile.TemporaryDirectory(prefix="das-lab-gpu-check-") as tmp:
        root = write_imagenet_folder(Path(tmp) / "imagenet", sizes.e2e_images_per_class)
        runs = {
            mode: train_end_to_end(device, sizes, precision, workers, root, Path(tmp) / mode, mode)
            for mode in NORMALIZE_ON
        }
    return {
        "model": sizes.e2e_model,
        "batch": sizes.batch,
        "image": sizes.image,
        "workers": workers,
        "train_images": sizes.e2e_images_per_class * len(IMAGENET_WNIDS),
        "normalize_on": runs,
    }


def train_end_to_end(
    device: torch.device, sizes: Sizes, precision: str, workers: int, root: Path, folder: Path, normalize_on: str
) -> dict[str, Any]:
    """One ``das-lab train`` epoch on ``root`` with ``data.normalize_on``: what :class:`LoaderWait` measured, and the wall time."""
    result = folder / "loader_wait.json"
    overrides = [
        "data=imagenet",
        f"data.root={root}",
        f"data.num_classes={len(IMAGENET_WNIDS)}",
        f"data.image_size={sizes.image}",
        f"data.batch_size={sizes.batch}",
        f"data.num_workers={workers}",
        f"data.persistent_workers={workers > 0}",
        f"data.prefetch_factor={2 if workers else 'null'}",
        f"data.pin_memory={device.type == 'cuda'}",
        f"data.normalize_on={normalize_on}",
        f"model={sizes.e2e_model}",
        f"trainer.accelerator={device.type}",
        f"trainer.precision={LIGHTNING_PRECISION[precision]}",
        f"task.channels_last={device.type == 'cuda'}",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "test=false",
        "logger=none",
        "callbacks=none",
        f"hydra.run.dir={folder / 'run'}",
        "+callbacks.loader_wait._target_=gpu_check.LoaderWait",
        f"+callbacks.loader_wait.out={result}",
    ]
    command = [str(Path(sys.executable).with_name("das-lab")), "train", *overrides]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(BENCHMARKS), os.environ.get("PYTHONPATH")))),
    }
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"das-lab train failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {"command_wall_s": wall, **json.loads(result.read_text())}


# ----------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    """The checks as one markdown table: check, figure, value, goal."""
    ratio, dat, loop, e2e = (results[k] for k in ("train_step_ratio", "dat_paths", "lightning_overhead", "end_to_end"))
    rows: list[list[Any]] = [
        [
            "DAS-ResNet-50 / ResNet-50 train step",
            f"{ratio['das_resnet50_ms']:.1f} / {ratio['resnet50_ms']:.1f} ms",
            ratio["ratio"],
            "<= 1.15",
        ],
    ]
    for path, label in (
        ("reference", "reference kernels"),
        ("fused", "fused kernels"),
        ("compiled", f"compiled, auto kernels ({dat['compile_backend']})"),
    ):
        rows.append(
            [
                f"{dat['model']} train, {label}",
                f"{dat[path]['img_s']:.1f} img/s, peak {dat[path]['peak_mib']:.0f} MiB",
                dat[path]["img_s"] / dat["reference"]["img_s"],
                "x reference",
            ]
        )
    rows.append(
        [
            "Lightning loop / plain loop",
            f"{loop['lightning_ms_per_step']:.1f} / {loop['plain_ms_per_step']:.1f} ms",
            loop["ratio"],
            "<= 1.05",
        ]
    )
    for mode in NORMALIZE_ON:
        rows.append(
            [
                f"das-lab train end to end ({e2e['workers']} workers, normalize_on={mode})",
                f"{e2e['normalize_on'][mode]['img_s']:.1f} img/s",
                e2e["normalize_on"][mode]["loader_wait_fraction"],
                "loader-wait share (0: compute-bound)",
            ]
        )
    return markdown_table(("check", "measured", "value", "goal / meaning"), [measured(row) for row in rows])


def machine(device: torch.device) -> dict[str, Optional[str | int]]:
    """What the figures were measured on."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="toy sizes (minutes on a CPU)")
    parser.add_argument(
        "--precision", default=None, choices=sorted(LIGHTNING_PRECISION), help="default: bf16 on GPUs, fp32 on CPUs"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="data loader workers for check 4 (default: min(8, CPUs))"
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of check 2 (as task.compile_backend; aot_eager: no code generation)",
    )
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    sizes = QUICK if args.quick else FULL
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    print(f"gpu_check on {device} ({'quick' if args.quick else 'full'} sizes, {precision})", flush=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(device), "sizes": asdict(sizes), "precision": precision}
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "train_step_ratio": lambda: check_train_step_ratio(device, sizes, precision),
        "dat_paths": lambda: check_dat_paths(device, sizes, precision, args.compile_backend),
        "lightning_overhead": lambda: check_lightning_overhead(device, sizes, precision),
        "end_to_end": lambda: check_end_to_end(device, sizes, precision, workers),
    }
    for name, check in checks.items():
        start = time.perf_counter()
        results[name] = check()
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    results["total_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\n{results['total_s']:.0f} s in all; figures in {args.out}")


if __name__ == "__main__":
    main()
