"""Detection: the generic FPN adapter, backbone options, and a few training steps per detector."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from pycocotools.coco import COCO
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from das_lab.config import config_dir
from das_lab.data.coco import CocoDataModule
from das_lab.models.fpn_backbone import FPNBackbone, freeze_batch_norm, freeze_stages
from das_lab.models.weights import WeightsMismatchError
from das_lab.tasks.detection import DetectionModule, load_backbone_weights
from fake_coco import make_fake_coco

TINY = dict(min_size=64, max_size=96, fpn_channels=16, box_head_dim=32)


class TinyBackbone(nn.Module):
    """A four-stage convolutional network with timm's feature API (``feature_info``, ``forward_intermediates``)."""

    def __init__(self, num_classes: int = 0, widths: tuple[int, ...] = (8, 16, 24, 32)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_info = [
            dict(num_chs=w, reduction=2 ** (i + 2), module=f"stages.{i}") for i, w in enumerate(widths)
        ]
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1), nn.BatchNorm2d(widths[0]), nn.ReLU())
        inputs = (widths[0],) + tuple(widths[:-1])
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.BatchNorm2d(o), nn.ReLU()) for i, o in zip(inputs, widths)
        )
        self.fc = nn.Linear(widths[-1], num_classes) if num_classes else nn.Identity()

    def forward_intermediates(
        self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW", intermediates_only=False
    ):
        take = range(len(self.stages)) if indices is None else indices
        x, features = self.stem(x), []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in take:
                features.append(x)
        return features if intermediates_only else (x, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_intermediates(x)[0].mean((2, 3)))


def _sgd(lr: float = 0.01):
    return partial(create_optimizer_v2, opt="momentum", lr=lr, momentum=0.9, weight_decay=1e-4)


def test_fpn_adapter_levels_and_strides() -> None:
    x = torch.rand(1, 3, 128, 96)
    rcnn = FPNBackbone(TinyBackbone(), (1, 2, 3, 4), out_channels=16, extra_block="maxpool")
    maps = rcnn(x)
    assert list(maps) == ["0", "1", "2", "3", "pool"] and rcnn.out_channels == 16
    assert rcnn.strides == (4, 8, 16, 32, 64)
    assert [tuple(m.shape) for m in maps.values()] == [(1, 16, 128 // s, 96 // s) for s in (4, 8, 16, 32)] + [
        (1, 16, 2, 2)
    ]
    retina = FPNBackbone(TinyBackbone(), (2, 3, 4), out_channels=16, extra_block="p6p7")
    assert retina.strides == (8, 16, 32, 64, 128) and len(retina(x)) == 5
    with pytest.raises(TypeError, match="Linear lacks forward_intermediates, feature_info: detection takes"):
        FPNBackbone(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"strides \[4, 8, 16\], but detection needs strides \[4, 8, 16, 32\]"):
        FPNBackbone(TinyBackbone(widths=(8, 16, 24)))
    with pytest.raises(ValueError, match="returned_stages=\\(0, 5\\)"):
        FPNBackbone(TinyBackbone(), (0, 5))


def test_frozen_batch_norm_keeps_outputs_and_frozen_stages_cover_stem_and_stage_one() -> None:
    net = TinyBackbone()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    x = torch.rand(2, 3, 64, 64)
    expected = net.eval().forward_intermediates(x, intermediates_only=True)
    freeze_batch_norm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in net.modules()) == 5
    for a, b in zip(expected, net.train().forward_intermediates(x, intermediates_only=True)):
        torch.testing.assert_close(a, b)
    frozen = freeze_stages(net, 1)
    assert frozen == ["stem.0.weight", "stem.0.bias", "stages.0.0.weight", "stages.0.0.bias"]
    assert [n for n, p in net.named_parameters() if p.requires_grad][0] == "stages.1.0.weight"
    with pytest.raises(ValueError, match="task.frozen_stages=5: expected 0 .* to 4"):
        freeze_stages(TinyBackbone(), 5)


def test_backbone_checkpoint_from_lightning_ckpt_and_state_dict(tmp_path: Path) -> None:
    source = TinyBackbone(num_classes=10)
    ckpt = tmp_path / "classification.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}}, ckpt)
    module = DetectionModule(TinyBackbone(), _sgd(), None, "faster_rcnn", 3, backbone_checkpoint=str(ckpt), **TINY)
    net = module.detector.backbone.net
    assert torch.equal(net.stages[2][0].weight, source.stages[2][0].weight)
    assert isinstance(net.stem[1], FrozenBatchNorm2d)
    torch.testing.assert_close(net.stem[1].running_var, source.stem[1].running_var)
    plain = tmp_path / "plain.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("stages.3")}, plain)
    with pytest.raises(WeightsMismatchError, match="missing from the file: stages.3.0.weight"):
        load_backbone_weights(TinyBackbone(), str(plain))
    with pytest.raises(ValueError, match="10-class head that detection does not use; set model.num_classes=0"):
        DetectionModule(TinyBackbone(num_classes=10), _sgd(), None, "faster_rcnn", 3, **TINY)
    with pytest.raises(ValueError, match="task.detector='yolo'"):
        DetectionModule(TinyBackbone(), _sgd(), None, "yolo", 3, **TINY)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_coco(tmp_path_factory.mktemp("coco"), num_train=4, num_val=3)


@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet", "mask_rcnn"])
def test_train_validate_test_writes_coco_results(coco_root: Path, tmp_path: Path, detector: str) -> None:
    torch.manual_seed(0)
    masks = detector == "mask_rcnn"
    dm = CocoDataModule(str(coco_root), batch_size=2, num_workers=0, num_classes=3, with_masks=masks)
    scheduler = partial(
        create_scheduler_v2, sched="multistep", decay_milestones=[8, 11], warmup_epochs=1, warmup_lr=1e-4
    )
    module = DetectionModule(TinyBackbone(), _sgd(0.01), scheduler, detector, 3, **TINY)
    trainer = L.Trainer(
        max_steps=2,
        max_epochs=12,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_test_batches=1,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"]) and any(k.startswith("train/loss_") for k in logged)
    assert 1e-4 < float(logged["train/lr"]) < 0.01  # linear warm-up, stepped per optimizer step
    names = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
    aps = {n: float(logged[f"val/{n}"]) for n in names}
    assert all(0.0 <= ap <= 1.0 or math.isnan(ap) for ap in aps.values())
    assert math.isnan(aps["map_large"])  # no fake object is large: undefined, not 0
    assert not (tmp_path / "detections_val.json").exists()  # written by validate/test, not every epoch
    results = trainer.test(module, datamodule=dm, verbose=False)[0]
    expected = {f"test/{n}" for n in names} | ({f"test/mask_{n}" for n in names} if masks else set())
    assert set(results) == expected
    detections = json.loads((tmp_path / "detections_test.json").read_text())
    # an untrained RetinaNet scores everything near its 0.01 prior, below the 0.05 output threshold
    assert bool(detections) == (detector != "retinanet")
    assert {d["category_id"] for d in detections} <= {3, 17, 90}
    assert all(len(d["bbox"]) == 4 and d["bbox"][2] >= 0 for d in detections)
    if masks:
        dm.with_masks = False
        with pytest.raises(ValueError, match="set data.with_masks=true"):
            trainer.fit(module, datamodule=dm)
    assert all(("segmentation" in d) == masks for d in detections)
    ground_truth = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    assert {d["image_id"] for d in detections} <= set(ground_truth.getImgIds())
    if detections:
        assert len(ground_truth.loadRes(str(tmp_path / "detections_test.json")).anns) == len(detections)


@pytest.mark.parametrize("model", ["timm", "das_resnet18"])
def test_timm_and_das_backbones_train_through_the_same_adapter(coco_root: Path, tmp_path: Path, model: str) -> None:
    """``model=timm model.name=resnet18`` and ``model=das_resnet18`` feed the FPN through forward_intermediates."""
    torch.manual_seed(0)
    overrides = [f"model={model}", "model.num_classes=0"] + (["model.name=resnet18"] if model == "timm" else [])
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["data=coco", "task=detection", *overrides])
    net = instantiate(cfg.model)
    gates = [m for m in net.modules() if type(m).__name__ == "DASGate"]
    assert (type(net).__name__, len(gates)) == (("ResNet", 0) if model == "timm" else ("DASResNet", 1))
    dm = CocoDataModule(str(coco_root), batch_size=2, num_workers=0, num_classes=3)
    module = DetectionModule(net, _sgd(0.01), None, "faster_rcnn", 3, frozen_stages=1, **TINY)
    fpn = module.detector.backbone
    x = torch.rand(1, 3, 64, 96)
    assert [tuple(m.shape[1:]) for m in fpn(x).values()][:4] == [(16, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    seen = []
    if gates:
        gates[0].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    trainer = L.Trainer(
        max_steps=2,
        max_epochs=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.global_step == 2 and len(seen) == (2 if gates else 0)  # the stage-3 gate ran in every step
    assert not net.conv1.weight.requires_grad and net.layer2[0].conv1.weight.requires_grad


@pytest.mark.parametrize(
    "experiment, detector",
    [
        ("coco_faster_rcnn_r50", "faster_rcnn"),
        ("coco_faster_rcnn_das_r50", "faster_rcnn"),
        ("coco_retinanet_das_r50", "retinanet"),
        ("coco_mask_rcnn_dat_tiny", "mask_rcnn"),
    ],
)
def test_experiments_compose_and_build(experiment: str, detector: str) -> None:
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={experiment}"])
    assert cfg.monitor == "val/map" and cfg.monitor_mode == "max" and cfg.model.num_classes == 0
    assert cfg.data._target_ == "das_lab.data.coco.CocoDataModule" and cfg.data.with_masks == (detector == "mask_rcnn")
    assert cfg.task.detector == detector and cfg.task.num_classes == 80 and cfg.trainer.max_epochs == 12
    assert list(cfg.scheduler.decay_milestones) == [8, 11]
    cfg.task.min_size, cfg.task.max_size = 64, 96
    module = instantiate(cfg.task, net=TinyBackbone(), optimizer=instantiate(cfg.optimizer), scheduler=None)
    assert module.detector_name == detector


@pytest.mark.slow
def test_cli_trains_and_tests_a_detector(coco_root: Path, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("das-lab")),
        "train",
        "data=coco",
        "task=detection",
        "model=resnet_tiny",
        "model.num_classes=0",
        f"data.root={coco_root}",
        "data.num_classes=3",
        "data.num_workers=0",
        "task.min_size=64",
        "task.max_size=96",
        "task.fpn_channels=16",
        "task.box_head_dim=32",
        "monitor=val/map",
        "flops_image_size=64",
        "trainer.max_steps=2",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"paths.log_dir={tmp_path}",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and "val/map" in metrics["best"]
    assert {"test/map", "test/map_50", "test/map_small", "train/loss"} <= set(metrics["final"])
    # no fake object is large (> 96^2 pixels): that AP is undefined, null rather than 0
    assert metrics["final"]["test/map_large"] is None and metrics["best"]["val/map_large"] is None
    assert isinstance(json.loads((run_dir / "detections_test.json").read_text()), list)

    evaluate = [
        str(Path(sys.executable).with_name("das-lab")),
        "eval",
        f"ckpt_path={metrics['ckpt_best']}",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"paths.log_dir={tmp_path}",
    ]
    run = subprocess.run(evaluate, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (eval_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if p != run_dir]
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    assert evaluated["final"]["test/map"] == pytest.approx(metrics["final"]["test/map"], abs=1e-6)
    assert evaluated["final"]["test/map_large"] is None
    assert metrics["gflops"] is not None and evaluated["gflops"] == pytest.approx(metrics["gflops"])
    for split in ("val", "test"):
        assert isinstance(json.loads((eval_dir / f"detections_{split}.json").read_text()), list)
