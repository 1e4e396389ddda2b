"""das-lab's models are timm models: the points of timm's own tests/test_models.py, on tiny variants.

timm's test suite is not available in CI, so the checks it makes on every registered model
(default_cfgs, forward_features/forward_head, forward_intermediates, features_only, grad
checkpointing, backward, pretrained loading) are repeated here, plus what das-lab adds: the DAS
gates are in every feature path, and bad input fails in one line.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from timm.models._features import FeatureGetterNet

from das_lab.models.builder import create_model
from das_lab.models.das import DASGate, gate_names
from das_lab.models.weights import WeightsMismatchError

# tiny variants of each family, at a small input (multiples of 32)
TINY = {
    "das_resnet_tiny": {},
    "resnet_tiny": {},
    "das_mobilenet_v2": dict(width_mult=0.25),
    "dat_nano": {},
}
SIZE = 64


def _x(batch: int = 1, size: int = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(TINY))
def test_default_cfg_head_and_classifier_reset(name):
    model = timm.create_model(name, **TINY[name]).eval()
    cfg = model.pretrained_cfg
    assert cfg is model.default_cfg and cfg["architecture"] == name
    for key in (
        "input_size",
        "crop_pct",
        "interpolation",
        "mean",
        "std",
        "num_classes",
        "first_conv",
        "classifier",
        "pool_size",
        "license",
    ):
        assert cfg.get(key) is not None, key
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state and f"{cfg['classifier']}.weight" in state
    assert model.num_classes == 1000 and model.num_features > 0 and model.head_hidden_size == model.num_features
    x = _x(size=cfg["input_size"][-1])
    with torch.no_grad():
        features = model.forward_features(x)
        assert isinstance(features, torch.Tensor)
        assert features.shape == (1, model.num_features, *cfg["pool_size"])
        pre = model.forward_head(features, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size)
        assert model(x).shape == (1, 1000)
        model.reset_classifier(0)
        assert model.num_classes == 0 and torch.equal(model(x), pre)
        model.reset_classifier(0, "")
        assert model(x).shape == features.shape
        unpooled = timm.create_model(name, num_classes=0, global_pool="", **TINY[name]).eval()
        assert unpooled(x).shape == features.shape


def test_every_das_lab_name_has_a_pretrained_cfg_and_declared_weights_where_they_exist():
    names = timm.list_models(["das_*", "daslab_*", "dat_*", "*_resnet*", "resnet_tiny"])
    ours = [
        n
        for n in names
        if timm.models.get_pretrained_cfg(n) and "das_lab" in timm.models.model_entrypoint(n).__module__
    ]
    assert {"das_resnet50", "daslab_resnet18", "se_resnet50", "dat_tiny", "dat_nano", "das_mobilenet_v2"} <= set(ours)
    pretrained = set(timm.list_models(pretrained=True))
    assert {
        "das_resnet50.tv_in1k",
        "daslab_resnet50.tv_in1k",
        "dat_tiny.in1k",
        "dat_base.in1k_384",
        "das_mobilenet_v2.tv_in1k",
    } <= pretrained
    assert timm.models.get_pretrained_cfg("das_resnet50").hf_hub_id == "timm/resnet50.tv_in1k"
    assert timm.models.get_pretrained_cfg("dat_tiny").url.startswith("https://cloud.tsinghua.edu.cn/")


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_intermediates_match_feature_info_and_forward_features(name):
    model = timm.create_model(name, **TINY[name]).eval()
    x = _x()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert [m.shape[1] for m in maps] == [info["num_chs"] for info in model.feature_info]
        assert [SIZE // m.shape[-1] for m in maps] == [info["reduction"] for info in model.feature_info]
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last_two, maps[-2:], rtol=0, atol=0)
        _, first = model.forward_intermediates(x, indices=[0, -1], stop_early=True)
        torch.testing.assert_close(first, [maps[0], maps[-1]], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_features_only_is_forward_intermediates_and_prunes(name):
    full = timm.create_model(name, **TINY[name]).eval()
    torch.manual_seed(0)
    feats = timm.create_model(name, features_only=True, out_indices=(1, 2), **TINY[name])
    assert isinstance(feats, FeatureGetterNet) and feats.pretrained_cfg["architecture"] == name
    feats.model.load_state_dict(full.state_dict(), strict=False)
    feats.eval()
    assert feats.feature_info.channels() == [full.feature_info[i]["num_chs"] for i in (1, 2)]
    with torch.no_grad():
        expected = full.forward_intermediates(_x(), indices=[1, 2], intermediates_only=True)
        torch.testing.assert_close(feats(_x()), expected, rtol=0, atol=0)
    assert sum(p.numel() for p in feats.parameters()) < sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("position", ["stage_end", "block", "skip"])
def test_das_resnet50_with_gates_on_all_stages_gives_one_final_map_through_every_path(position):
    """The defect this guards against: timm's ResNet.forward_intermediates skipped das-lab's stage gates."""
    torch.manual_seed(0)
    model = timm.create_model("das_resnet50", gate_stages=[1, 2, 3, 4], gate_position=position).eval()
    assert len(gate_names(model)) == (4 if position == "stage_end" else 16)
    feats = timm.create_model("das_resnet50", gate_stages=[1, 2, 3, 4], gate_position=position, features_only=True)
    feats.model.load_state_dict(model.state_dict(), strict=False)
    x = _x(size=32)
    with torch.no_grad():
        final = model.forward_features(x)
        through_intermediates, maps = model.forward_intermediates(x)
        through_features_only = feats.eval()(x)[-1]
    torch.testing.assert_close(through_intermediates, final, rtol=0, atol=0)
    torch.testing.assert_close(maps[-1], final, rtol=0, atol=0)
    torch.testing.assert_close(through_features_only, final, rtol=0, atol=0)


def test_intermediates_are_the_gated_stage_maps():
    model = timm.create_model("das_resnet_tiny").eval()  # gates after stages 2 and 3
    seen = {}
    for stage in ("2", "3"):
        model.stage_gates[stage].register_forward_hook(lambda m, i, o, s=stage: seen.__setitem__(s, (i[0], o)))
    with torch.no_grad():
        maps = model.forward_intermediates(_x(), intermediates_only=True)
    for stage in ("2", "3"):
        ungated, gated = seen[stage]
        torch.testing.assert_close(maps[int(stage)], gated, rtol=0, atol=0)
        assert not torch.allclose(gated, ungated)


def _grads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(x).logsumexp(1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "name, block",
    [("das_resnet_tiny", "layer2.0"), ("dat_nano", "stages.1.mlps.0"), ("das_mobilenet_v2", "features.5")],
)
def test_grad_checkpointing_recomputes_blocks_and_keeps_gradients(name, block):
    torch.manual_seed(0)
    # eval: no dropout/drop-path randomness and no batch-norm statistics updates between the two runs
    model = timm.create_model(name, num_classes=3, **TINY[name]).eval()
    calls = []
    model.get_submodule(block).register_forward_pre_hook(lambda *args: calls.append(1))
    x = _x(batch=2)
    plain = _grads(model, x)
    plain_calls = len(calls)
    model.set_grad_checkpointing(True)
    calls.clear()
    checkpointed = _grads(model, x)
    assert plain_calls == 1 and len(calls) == 2  # the block ran again in the backward pass
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TINY))
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42, **TINY[name]).train()
    out = model(_x(batch=2))
    out.mean().backward()
    assert out.shape == (2, 42)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ---------------------------------------------------------------- weights through timm's mechanism


def test_pretrained_file_of_a_torchvision_resnet_loads_with_fresh_gates(tmp_path, caplog):
    torch.manual_seed(0)
    plain = torchvision.models.resnet18()
    path = tmp_path / "resnet18_tv.pth"
    torch.save(plain.state_dict(), path)
    with caplog.at_level("INFO"):
        model = timm.create_model("das_resnet18", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    torch.testing.assert_close(model.layer4[1].conv2.weight, plain.layer4[1].conv2.weight)
    torch.testing.assert_close(model.fc.weight, plain.fc.weight)
    assert "stage_gates.3" in caplog.text and "start fresh" in caplog.text
    assert torch.count_nonzero(model.stage_gates["3"].offset.weight) == 0  # the gate kept its initialisation
    ten = timm.create_model("das_resnet18", pretrained=True, num_classes=10, pretrained_cfg_overlay={"file": str(path)})
    assert ten.fc.weight.shape == (10, 512)
    torch.testing.assert_close(ten.conv1.weight, plain.conv1.weight)


def test_pretrained_file_of_torchvision_mobilenet_v2_loads(tmp_path):
    plain = torchvision.models.mobilenet_v2()
    path = tmp_path / "mbv2.pth"
    torch.save(plain.state_dict(), path)
    model = timm.create_model("das_mobilenet_v2", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    torch.testing.assert_close(model.features[17].conv[0][0].weight, plain.features[17].conv[0][0].weight)
    assert isinstance(model.stage_gates["2"], DASGate)


def test_pretrained_file_in_the_official_dat_layout_loads_and_resizes_tables(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("dat_nano").eval()
    path = tmp_path / "dat_pp_nano.pth"
    torch.save({"model": source.state_dict(), "optimizer": {}, "epoch": 299}, path)  # the official file layout
    same = timm.create_model("dat_nano", pretrained=True, pretrained_cfg_overlay={"file": str(path)}).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(same(x), source(x))
    bigger = timm.create_model(
        "dat_nano",
        pretrained=True,
        img_size=96,
        num_classes=5,
        out_norms=True,
        pretrained_cfg_overlay={"file": str(path)},
    )
    assert bigger.stages[0].attns[1].rpe_table.shape == (1, 47, 47) and bigger.cls_head.weight.shape == (5, 128)
    torch.testing.assert_close(bigger.stages[2].attns[0].rpb, source.stages[2].attns[0].rpb)


def test_detection_norms_follow_the_official_backbone():
    model = timm.create_model("dat_nano", out_norms=True).eval()
    assert [k for k in model.state_dict() if k.startswith("norms.")] == [
        f"norms.{i}.norm.{p}" for i in range(4) for p in ("weight", "bias")
    ]
    with torch.no_grad():
        model.norms[2].norm.bias.fill_(3.0)
        final, maps = model.forward_intermediates(_x())
        raw = timm.create_model("dat_nano").eval()
        raw.load_state_dict(model.state_dict(), strict=False)
        _, raw_maps = raw.forward_intermediates(_x())
    torch.testing.assert_close(maps[2], model.norms[2](raw_maps[2]))
    torch.testing.assert_close(final, raw_maps[3])  # the trunk itself is not normalised


def test_model_checkpoint_and_pretrained_share_one_loader(tmp_path):
    """``model.checkpoint=`` (das-lab's loader) maps the same layouts as timm's pretrained path."""
    plain = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in plain.state_dict().items()}}, path)
    model = create_model("das_resnet18", checkpoint=str(path))
    torch.testing.assert_close(model.layer1[0].conv1.weight, plain.layer1[0].conv1.weight)
    plain_timm = create_model("resnet18", checkpoint=str(path))  # any timm model
    torch.testing.assert_close(plain_timm.layer1[0].conv1.weight, plain.layer1[0].conv1.weight)


# ---------------------------------------------------------------- bad input: one line each


def test_unknown_name_out_of_range_indices_and_foreign_checkpoint_fail_in_one_line(tmp_path):
    with pytest.raises(
        ValueError, match=r"model.name='das_resnet5' is not a timm model; did you mean .*das_resnet50"
    ) as err:
        create_model("das_resnet5")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"indices=\(1, 7\): DASResNet has feature levels 0\.\.4") as err:
        timm.create_model("das_resnet_tiny", features_only=True, out_indices=(1, 7))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"indices=\[5\]: DAT has feature levels 0\.\.3"):
        timm.create_model("dat_nano").forward_intermediates(_x(), indices=[5])
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(
        WeightsMismatchError,
        match=r"other\.pth: no key fits this model \(file has e\.g\. "
        r"'encoder\.weight', the model expects e\.g\. 'conv1\.weight'\)",
    ) as err:
        timm.create_model("das_resnet_tiny", checkpoint=str(path))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="feature_cls='hook' would hook module outputs and miss the DAS gates"):
        timm.create_model("das_resnet_tiny", features_only=True, feature_cls="hook")


# ---------------------------------------------------------------- registration and tracing


def test_importing_das_lab_registers_the_models_without_importing_torch():
    code = (
        "import sys, das_lab; assert 'torch' not in sys.modules, 'torch imported'; "
        "import timm; assert timm.is_model('das_resnet50') and timm.is_model('dat_tiny'); print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


@pytest.mark.parametrize("name", ["das_resnet_tiny", "das_mobilenet_v2"])
def test_das_networks_script_with_torchscript_like_timm_models(name):
    """timm's model tests script every model; the DAS gate's eager-only branches must stay out of the script."""
    model = create_model(name, **TINY[name]).eval()
    scripted = torch.jit.script(model)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
