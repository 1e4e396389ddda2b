"""DAS-ResNets, baselines and DAS-MobileNetV2: registry, contract, placement, checkpoints, configs."""

import inspect
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from das_lab.models import das_mobilenet, das_resnet
from das_lab.models.builder import FACTORY_KEYS, variant_args
from das_lab.models.das import DASGate, capture_gate_maps, gate_names
from das_lab.models.weights import load_weights
from das_lab.utils.flops import count_params

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
NAMES = sorted(name for name, _, _ in das_resnet.VARIANTS) + ["das_mobilenet_v2"]
LIGHT = [n for n in NAMES if not n.endswith(("50", "101"))]
HEAVY = [n for n in NAMES if n.endswith(("50", "101"))]


def _check_features(model, size):
    with torch.no_grad():
        final, feats = model.eval().forward_intermediates(torch.randn(1, 3, size, size))
    assert len(feats) == 5
    assert [info["reduction"] for info in model.feature_info] == [2, 4, 8, 16, 32]
    for f, info in zip(feats, model.feature_info):
        assert f.shape == (1, info["num_chs"], size // info["reduction"], size // info["reduction"])
    assert final is feats[-1] and final.shape[1] == model.num_features
    return final


@pytest.mark.parametrize("name", LIGHT)
def test_light_variants_forward_backward_and_contract(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    assert model.num_classes == 7
    _check_features(model, 64)
    logits = model.train()(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    head = timm.create_model(name, num_classes=0).eval()
    assert head(torch.randn(1, 3, 32, 32)).shape == (1, head.num_features)


@pytest.mark.parametrize("name", HEAVY)
def test_deep_variants_build_and_run_forward(name):
    model = timm.create_model(name, num_classes=5)
    feats = _check_features(model, 64)
    assert model.forward_head(feats).shape == (1, 5)


def test_names_do_not_replace_timm_models():
    assert type(timm.create_model("resnet18")).__module__ == "timm.models.resnet"
    for name in NAMES:
        assert timm.is_model(name)
    with pytest.raises(ValueError, match="se_resnet50 declares no pretrained weights.*model.checkpoint="):
        timm.create_model("se_resnet50", pretrained=True)


def test_parameter_counts_match_the_reference_networks():
    assert count_params(timm.create_model("daslab_resnet50")) == 25_557_032
    assert count_params(torchvision.models.resnet50()) == 25_557_032
    assert count_params(timm.create_model("se_resnet50")) == 28_088_024
    assert count_params(timm.create_model("seresnet50")) == 28_088_024


@pytest.mark.parametrize(
    ("position", "gate_keys", "n_gates"),
    [
        ("stage_end", ["stage_gates.2.dw.weight", "stage_gates.4.deform.weight"], 2),
        ("block", ["layer2.0.se.dw.weight", "layer4.1.se.offset.weight"], 4),
        ("skip", ["layer2.0.downsample.2.dw.weight", "layer2.1.downsample.pw.weight"], 4),
    ],
)
def test_gate_positions_place_gates_where_documented(position, gate_keys, n_gates):
    model = das_resnet.DASResNet(
        num_classes=3,
        block="basic",
        layers=(2, 2, 2, 2),
        channels=(8, 16, 32, 64),
        stem_width=8,
        gate_stages=[2, 4],
        gate_position=position,
        reduction=0.5,
        offset_groups=[1, 2, 1, 4],
    )
    keys = model.state_dict().keys()
    assert all(k in keys for k in gate_keys)
    assert len(gate_names(model)) == n_gates
    assert "layer2.0.downsample.0.weight" in keys and "layer2.0.downsample.1.running_mean" in keys
    with capture_gate_maps(model) as maps:
        model(torch.randn(1, 3, 64, 64))
    assert sorted(maps) == sorted(gate_names(model))
    assert maps[gate_names(model)[-1]].offsets.shape[1] == 2 * 4 * 9  # stage 4 has 4 offset groups


def test_block_gates_refuse_an_occupied_attention_slot():
    with pytest.raises(ValueError, match=r"model\.gate_position=block .* model\.attn_layer=se"):
        das_resnet.DASResNet("basic", (1, 1, 1, 1), attn_layer="se", gate_stages=[1], gate_position="block")


@pytest.mark.parametrize("position", ["stage_end", "block", "skip"])
def test_plain_torchvision_checkpoint_loads_into_das_resnet18(tmp_path, position):
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "resnet18.pth"
    torch.save(plain.state_dict(), path)
    model = timm.create_model(
        "das_resnet18", num_classes=10, checkpoint=str(path), gate_position=position, gate_stages=[2, 3]
    )
    torch.testing.assert_close(model.layer3[1].conv2.weight, plain.layer3[1].conv2.weight)
    torch.testing.assert_close(model.fc.bias, plain.fc.bias)
    report = load_weights(model, path, new_modules=gate_names(model))
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.expected_missing and all(
        any(k.startswith(g + ".") for g in gate_names(model)) for k in report.expected_missing
    )
    assert len(report.loaded) == len(plain.state_dict())


def test_plain_torchvision_checkpoint_loads_into_das_mobilenet_v2(tmp_path):
    plain = torchvision.models.mobilenet_v2(num_classes=4)
    path = tmp_path / "mbv2.pth"
    torch.save({"model": plain.state_dict()}, path)
    model = timm.create_model("das_mobilenet_v2", num_classes=4, checkpoint=str(path))
    torch.testing.assert_close(model.features[17].conv[0][0].weight, plain.features[17].conv[0][0].weight)
    assert sorted(s for s, g in model.stage_gates.items() if isinstance(g, DASGate)) == ["2", "3"]


def test_classifier_mismatch_names_num_classes(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    with pytest.raises(
        RuntimeError, match=r"(?s)fc\.weight file \[1000, 512\] vs model \[10, 512\].*model\.num_classes"
    ):
        timm.create_model("daslab_resnet18", num_classes=10, checkpoint=str(path))
    model = timm.create_model("das_resnet18", num_classes=10, checkpoint=str(path), checkpoint_strict=False)
    assert model.fc.weight.shape == (10, 512)


FAMILY_CONFIGS = sorted(p for p in CONF.glob("*.yaml") if not p.name.startswith(("dat_", "timm")))


@pytest.mark.parametrize("path", FAMILY_CONFIGS, ids=lambda p: p.stem)
def test_model_configs_mirror_the_constructor(path):
    target = das_mobilenet.DASMobileNetV2 if path.stem == "das_mobilenet_v2" else das_resnet.DASResNet
    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={path.stem}"]).model
    assert cfg._target_ == "das_lab.models.builder.create_model" and timm.is_model(cfg.name)
    assert set(cfg) - set(FACTORY_KEYS) == set(inspect.signature(target).parameters) - {"num_classes"}
    # the timm registry builds the variant from this same file
    assert {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in FACTORY_KEYS} == variant_args(path.stem)
    if path.stem in ("resnet_tiny", "das_resnet_tiny", "das_mobilenet_v2", "cbam_resnet18", "das_resnet18"):
        model = instantiate(cfg, num_classes=6).eval()
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 6)


def test_variant_configs_are_a_base_plus_a_short_delta():
    """A variant is its base config plus a few lines: only the base configs list every key."""
    bases = {"resnet50.yaml", "dat_tiny.yaml", "das_mobilenet_v2.yaml", "timm.yaml"}
    for path in CONF.glob("*.yaml"):
        node = OmegaConf.load(path)
        if path.name not in bases:
            assert len(node.defaults) == 2 and len(node) <= 12, path.name
