"""Semantic segmentation: mmseg's scores against an independent count, heads, inference paths, schedule."""

from __future__ import annotations

from functools import partial

import lightning as L
import numpy as np
import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

import das_lab.models  # noqa: F401  (registers das-lab's models with timm)
from das_lab.tasks.segmentation import SegmentationModule
from das_lab.tasks.segmentation_metrics import SegmentationScores


def numpy_scores(
    predictions: list[np.ndarray], labels: list[np.ndarray], num_classes: int, ignore: int = 255
) -> tuple[float, float, float]:
    """mIoU, mAcc, aAcc counted pixel by pixel with numpy, classes without union/label left out."""
    intersection, union, area = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for prediction, label in zip(predictions, labels):
        valid = label != ignore
        for c in range(num_classes):
            predicted, labelled = (prediction == c) & valid, (label == c) & valid
            intersection[c] += np.sum(predicted & labelled)
            union[c] += np.sum(predicted | labelled)
            area[c] += np.sum(labelled)
    iou = [i / u for i, u in zip(intersection, union) if u > 0]
    acc = [i / a for i, a in zip(intersection, area) if a > 0]
    return float(np.mean(iou)), float(np.mean(acc)), float(intersection.sum() / area.sum())


def _random_maps(seed: int, count: int = 4) -> tuple[list[np.ndarray], list[np.ndarray]]:
    # labels use classes 0-2 and the ignore label, predictions 0-3: class 3 is predicted but never
    # labelled (IoU 0, no accuracy), class 4 appears nowhere (left out of both means)
    rng = np.random.default_rng(seed)
    labels = [rng.choice([0, 1, 2, 255], size=(7 + i, 9)) for i in range(count)]
    predictions = [rng.integers(0, 4, size=label.shape) for label in labels]
    return predictions, labels


def test_scores_on_a_hand_counted_example() -> None:
    metric = SegmentationScores(num_classes=3)
    metric.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 0], [1, 255]]))
    scores = metric.compute()
    # class 0: 1 of union 2; class 1: 1 of union 2; class 2 nowhere. Acc: 1/2 and 1/1. aAcc: 2 of 3.
    assert scores["miou"].item() == pytest.approx(0.5)
    assert scores["macc"].item() == pytest.approx(0.75)
    assert scores["aacc"].item() == pytest.approx(2 / 3)
    assert torch.isnan(scores["iou"][2]) and torch.isnan(scores["acc"][2])


def test_scores_equal_an_independent_numpy_count() -> None:
    predictions, labels = _random_maps(0)
    metric = SegmentationScores(num_classes=5)
    for prediction, label in zip(predictions, labels):
        metric.update(torch.from_numpy(prediction), torch.from_numpy(label))
    scores = metric.compute()
    expected = numpy_scores(predictions, labels, 5)
    assert [scores[k].item() for k in ("miou", "macc", "aacc")] == pytest.approx(expected, abs=1e-12)
    assert scores["iou"][3].item() == 0.0 and torch.isnan(scores["iou"][4]) and torch.isnan(scores["acc"][3])


def test_scores_sum_across_processes() -> None:
    """Per-process counts merged with the metric's own reductions equal one count over all images."""
    predictions, labels = _random_maps(1, count=6)
    whole, parts = SegmentationScores(5), [SegmentationScores(5), SegmentationScores(5)]
    for i, (prediction, label) in enumerate(zip(predictions, labels)):
        whole.update(torch.from_numpy(prediction), torch.from_numpy(label))
        parts[i % 2].update(torch.from_numpy(prediction), torch.from_numpy(label))
    parts[0].merge_state(parts[1])
    merged, expected = parts[0].compute(), whole.compute()
    assert all(torch.equal(merged[k], expected[k]) for k in ("miou", "macc", "aacc"))


def test_scores_reject_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="target holds 7; expected 0..4 or 255"):
        SegmentationScores(5).update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7))


def _module(net: nn.Module | None = None, **settings) -> SegmentationModule:
    defaults = dict(
        num_classes=5, channels=16, neck_channels=16, aux_channels=8, test_scale=(64, 48), crop_size=32, stride=24
    )
    return SegmentationModule(
        net if net is not None else timm.create_model("test_convnext", num_classes=0),
        partial(create_optimizer_v2, opt="adamw", lr=1e-3),
        **{**defaults, **settings},
    )


@pytest.mark.parametrize(("head", "aux_weight"), [("upernet", 0.4), ("fpn", 0.0)])
def test_heads_give_logits_at_the_input_size(head: str, aux_weight: float) -> None:
    module = _module(head=head, aux_weight=aux_weight)
    logits, aux = module.segmentor.forward_train(torch.randn(2, 3, 64, 96))
    assert logits.shape == (2, 5, 64, 96)
    assert (aux is not None and aux.shape == (2, 5, 64, 96)) == (aux_weight > 0)
    assert module.segmentor.backbone.feature_info.reduction() == [4, 8, 16, 32]


def test_upernet_widths_follow_the_official_config() -> None:
    module = _module(timm.create_model("test_resnet", num_classes=0), channels=32, aux_channels=16)
    head = module.segmentor.head
    assert len(head.ppm.stages) == 4 and head.fuse[0].in_channels == 4 * 32
    assert module.segmentor.aux_head.convs[0][0].in_channels == module.segmentor.backbone.feature_info.channels()[2]
    assert isinstance(head.fuse[1], nn.BatchNorm2d) and head.classifier[0].p == 0.1


@pytest.mark.parametrize("name", ["test_convnext", "das_resnet_tiny"])
def test_a_features_only_backbone_is_used_as_built(name: str) -> None:
    net = timm.create_model(name, features_only=True, out_indices=(-4, -3, -2, -1))
    module = _module(net)
    assert module.segmentor.backbone is net
    assert module(torch.randn(2, 3, 64, 64)).shape == (2, 5, 64, 64)


def test_a_model_without_the_feature_api_is_refused() -> None:
    with pytest.raises(TypeError, match="no forward_intermediates/feature_info"):
        _module(nn.Conv2d(3, 8, 3))


class Pointwise(nn.Module):
    """A segmentor whose logits at a pixel depend on that pixel only: every inference path must agree."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _pointwise(**settings) -> SegmentationModule:
    module = _module(**settings)
    module.segmentor = Pointwise().eval()
    return module


def test_sliding_window_equals_whole_image_on_a_pointwise_model() -> None:
    image = torch.randn(3, 50, 70, generator=torch.Generator().manual_seed(0))
    settings = dict(test_scale=(70, 50), crop_size=32, stride=20)
    whole_module = _pointwise(**settings)
    slide_module = _pointwise(inference="slide", **settings)
    slide_module.segmentor.load_state_dict(whole_module.segmentor.state_dict())
    with torch.no_grad():
        whole = whole_module.predict_probabilities(image)
        slide = slide_module.predict_probabilities(image)
    assert whole.shape == slide.shape == (5, 50, 70)
    torch.testing.assert_close(slide, whole)
    assert torch.allclose(whole.sum(0), torch.ones(50, 70))


def test_flip_and_scales_average_to_single_view_on_trivial_inputs() -> None:
    single = _pointwise(test_scale=(80, 60))
    tta = _pointwise(test_scale=(80, 60), tta_scales=(0.5, 0.75, 1.0, 1.5), flip=True)
    tta.segmentor.load_state_dict(single.segmentor.state_dict())
    constant = torch.ones(3, 30, 40) * torch.tensor([0.3, -0.2, 0.5])[:, None, None]
    noise = torch.randn(3, 30, 40, generator=torch.Generator().manual_seed(1))
    flip_only = _pointwise(test_scale=(40, 30), flip=True)
    flip_only.segmentor.load_state_dict(single.segmentor.state_dict())
    same_scale = _pointwise(test_scale=(40, 30))
    same_scale.segmentor.load_state_dict(single.segmentor.state_dict())
    with torch.no_grad():
        # a constant image looks the same at every scale and mirrored
        torch.testing.assert_close(tta.predict_probabilities(constant), single.predict_probabilities(constant))
        # a pointwise model commutes with mirroring, so flip TTA changes nothing at the image's own scale
        torch.testing.assert_close(flip_only.predict_probabilities(noise), same_scale.predict_probabilities(noise))
        assert tta.predict_probabilities(noise).shape == (5, 30, 40)


def test_loss_averages_over_all_pixels_as_mmseg_0x() -> None:
    module = _module()
    logits = torch.randn(1, 5, 4, 4)
    labels = torch.randint(0, 5, (1, 4, 4))
    labels[0, :2] = 255
    summed = nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="sum")
    assert module._loss(logits, labels).item() == pytest.approx(summed.item() / 16)


class _Crops(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        return torch.randn(3, 32, 32), torch.randint(0, 5, (32, 32)), f"img{index}"


class _LrTrace(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_poly_schedule_counts_warm_up_and_decay_in_iterations() -> None:
    scheduler = partial(
        create_scheduler_v2,
        sched="poly",
        decay_rate=1.0,
        warmup_epochs=2,
        warmup_prefix=False,
        warmup_lr=1e-6,
        min_lr=0.0,
    )
    module = SegmentationModule(
        timm.create_model("test_convnext", num_classes=0),
        partial(create_optimizer_v2, opt="adamw", lr=1e-3),
        scheduler,
        num_classes=5,
        channels=8,
        aux_channels=8,
    )
    trace = _LrTrace()
    loader = torch.utils.data.DataLoader(_Crops(), batch_size=2, collate_fn=lambda b: [list(x) for x in zip(*b)])
    trainer = L.Trainer(
        max_epochs=-1,
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[trace],
    )
    trainer.fit(module, train_dataloaders=loader)
    # warm-up from 1e-6 to 1e-3 over 2 iterations, then 1e-3 x (1 - t / 6)
    expected = [1e-6, 1e-6 + (1e-3 - 1e-6) / 2] + [1e-3 * (1 - t / 6) for t in range(2, 6)]
    assert trace.lrs == pytest.approx(expected, rel=1e-6)
