"""DAT++: official architecture (keys, shapes, params, FLOPs), neighborhood attention, sizes, loading, configs."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from das_lab.models import dat
from das_lab.models import neighborhood_attention as na
from das_lab.models.builder import FACTORY_KEYS, variant_args
from das_lab.models.weights import WeightsMismatchError
from das_lab.utils.flops import count_gmacs, count_params

CONF = Path(__file__).resolve().parents[1] / "conf"


def small(variant: str, **overrides) -> dat.DAT:
    """A named variant's block layout, heads and groups at 4 channels per head and 2 blocks per stage."""
    dims = [4 * h for h in variant_args(variant)["heads"]]
    args = dict(
        dims=dims,
        dim_stem=dims[0],
        depths=[2, 2, 2, 2],
        stage_spec=[["N", "D"], ["N", "D"], ["N", "D"], ["D", "D"]],
        img_size=64,
        num_classes=5,
    )
    return timm.create_model(variant, **{**args, **overrides})


def nano(**overrides) -> dat.DAT:
    torch.manual_seed(0)
    return timm.create_model("dat_nano", **{"num_classes": 4, "drop_path_rate": 0.0, **overrides})


# ---------------------------------------------------------------- official state_dict naming scheme


def official_dat_pp_keys(dim_stem, dims, depths, heads, groups, img_size=224, num_classes=1000):
    """Key -> shape of the official DAT++ state_dict (conv patches, LPU, DWC-MLP, N/D blocks, default rpe)."""
    keys = {}

    def ln(prefix, c):
        keys[f"{prefix}.norm.weight"] = (c,)
        keys[f"{prefix}.norm.bias"] = (c,)

    keys["patch_proj.0.weight"] = (dim_stem // 2, 3, 3, 3)
    keys["patch_proj.0.bias"] = (dim_stem // 2,)
    ln("patch_proj.1", dim_stem // 2)
    keys["patch_proj.3.weight"] = (dim_stem, dim_stem // 2, 3, 3)
    keys["patch_proj.3.bias"] = (dim_stem,)
    ln("patch_proj.4", dim_stem)
    fmap = img_size // 4
    for i, (c, depth, h, g) in enumerate(zip(dims, depths, heads, groups)):
        spec = ["D", "D"] if i == 3 else ["N", "D"] * (depth // 2)
        s = f"stages.{i}"
        for d, kind in enumerate(spec):
            ln(f"{s}.layer_norms.{2 * d}", c)
            ln(f"{s}.layer_norms.{2 * d + 1}", c)
            keys[f"{s}.mlps.{d}.linear1.0.weight"] = (4 * c, c, 1, 1)
            keys[f"{s}.mlps.{d}.linear1.0.bias"] = (4 * c,)
            keys[f"{s}.mlps.{d}.linear2.0.weight"] = (c, 4 * c, 1, 1)
            keys[f"{s}.mlps.{d}.linear2.0.bias"] = (c,)
            keys[f"{s}.mlps.{d}.dwc.weight"] = (4 * c, 1, 3, 3)
            keys[f"{s}.mlps.{d}.dwc.bias"] = (4 * c,)
            keys[f"{s}.local_perception_units.{d}.weight"] = (c, 1, 3, 3)
            keys[f"{s}.local_perception_units.{d}.bias"] = (c,)
            a = f"{s}.attns.{d}"
            if kind == "N":
                keys[f"{a}.qkv.weight"] = (3 * c, c)
                keys[f"{a}.qkv.bias"] = (3 * c,)
                keys[f"{a}.rpb"] = (h, 13, 13)
                keys[f"{a}.proj.weight"] = (c, c)
                keys[f"{a}.proj.bias"] = (c,)
            else:
                gc, k = c // g, [9, 7, 5, 3][i]
                keys[f"{a}.conv_offset.0.weight"] = (gc, 1, k, k)
                keys[f"{a}.conv_offset.0.bias"] = (gc,)
                ln(f"{a}.conv_offset.1", gc)
                keys[f"{a}.conv_offset.3.weight"] = (2, gc, 1, 1)
                for proj in ("proj_q", "proj_k", "proj_v", "proj_out"):
                    keys[f"{a}.{proj}.weight"] = (c, c, 1, 1)
                    keys[f"{a}.{proj}.bias"] = (c,)
                keys[f"{a}.rpe_table"] = (h, 2 * fmap - 1, 2 * fmap - 1)
        fmap //= 2
    for i in range(3):
        keys[f"down_projs.{i}.0.weight"] = (dims[i + 1], dims[i], 3, 3)
        ln(f"down_projs.{i}.1", dims[i + 1])
    ln("cls_norm", dims[-1])
    keys["cls_head.weight"] = (num_classes, dims[-1])
    keys["cls_head.bias"] = (num_classes,)
    return keys


def test_state_dict_matches_official_dat_tiny():
    with torch.device("meta"):
        model = timm.create_model("dat_tiny")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = official_dat_pp_keys(64, [64, 128, 256, 512], [2, 4, 18, 2], [2, 4, 8, 16], [1, 2, 4, 8])
    assert len(official) == 589
    assert sorted(set(ours) ^ set(official)) == []
    assert ours == official


@pytest.mark.parametrize("variant,official_m", [("dat_tiny", 23.96), ("dat_small", 53.13), ("dat_base", 93.69)])
def test_param_counts_of_real_variants(variant, official_m):
    with torch.device("meta"):
        model = timm.create_model(variant)
    assert count_params(model) / 1e6 == pytest.approx(official_m, abs=0.005)


def test_dat_tiny_gflops_match_official_measurement():
    with torch.device("meta"):
        model = timm.create_model("dat_tiny")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.zeros(1, 3, 224, 224, device="meta"))
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    without_sampling = sum(n for op, n in counts.items() if "grid_sampler" not in op) / 2e9
    assert without_sampling == pytest.approx(4.26, rel=0.01)
    assert count_gmacs(model, (1, 3, 224, 224), device="meta") == pytest.approx(without_sampling, rel=0.01)
    assert counts["aten.grid_sampler_2d"] > 0


# ---------------------------------------------------------------- neighborhood attention


def brute_force_na(q, k, v, rpb, kernel):
    """Global attention over all positions, masked to each query's neighborhood (NATTEN's definition), with its bias."""
    b, n, hgt, wid, d = q.shape
    half = kernel // 2
    logits = torch.full((b, n, hgt, wid, hgt, wid), float("-inf"), dtype=q.dtype)
    for i in range(hgt):
        for j in range(wid):
            # the window keeps its size by shifting inwards at borders; it is the whole axis when shorter
            r0 = min(max(i - half, 0), max(hgt - kernel, 0))
            c0 = min(max(j - half, 0), max(wid - kernel, 0))
            for y in range(r0, min(r0 + kernel, hgt)):
                for x in range(c0, min(c0 + kernel, wid)):
                    score = (q[:, :, i, j] * k[:, :, y, x]).sum(-1)
                    logits[:, :, i, j, y, x] = score + rpb[:, y - i + kernel - 1, x - j + kernel - 1]
    attn = logits.flatten(-2).softmax(-1)
    return torch.einsum("bnijm,bnmd->bnijd", attn, v.flatten(2, 3))


@pytest.mark.parametrize(
    "size,kernel", [((9, 10), 7), ((7, 7), 7), ((4, 6), 7), ((1, 3), 7), ((8, 5), 3), ((11, 13), 5)]
)
def test_torch_neighborhood_attention_equals_masked_global_attention(size, kernel):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, *size, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(3, 2 * kernel - 1, 2 * kernel - 1, generator=gen, dtype=torch.float64)
    out = na.neighborhood_attention(q, k, v, rpb, kernel)
    torch.testing.assert_close(out, brute_force_na(q, k, v, rpb, kernel))


def test_neighborhood_attention_module_equals_reference():
    torch.manual_seed(0)
    module = na.NeighborhoodAttention2D(8, 7, 2).double()
    x = torch.randn(1, 8, 9, 8, dtype=torch.float64)
    qkv = module.qkv(x.permute(0, 2, 3, 1)).reshape(1, 9, 8, 3, 2, 4).permute(3, 0, 4, 1, 2, 5)
    ref = brute_force_na(qkv[0] * 4**-0.5, qkv[1], qkv[2], module.rpb.detach(), 7)
    ref = module.proj(ref.permute(0, 2, 3, 1, 4).reshape(1, 9, 8, 8)).permute(0, 3, 1, 2)
    torch.testing.assert_close(module(x), ref)


# ---------------------------------------------------------------- model behaviour


@pytest.mark.parametrize("variant", ["dat_tiny", "dat_small", "dat_base", "dat_nano"])
def test_variant_forward_backward(variant):
    torch.manual_seed(0)
    model = small(variant) if variant != "dat_nano" else timm.create_model("dat_nano", num_classes=5)
    x = torch.randn(1, 3, 32, 64)
    model.eval()
    final, features = model.forward_intermediates(x)
    assert [tuple(f.shape) for f in features] == [
        (1, info["num_chs"], 32 // info["reduction"], 64 // info["reduction"]) for info in model.feature_info
    ]
    torch.testing.assert_close(model(x), model.forward_head(final))
    logits = model.train()(x)
    assert logits.shape == (1, 5)
    logits.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.stages[0].attns[1].conv_offset[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [(64, 96), (96, 160), (32, 32)])
def test_odd_and_small_input_sizes(size):
    model = nano().eval()
    h, w = size
    with torch.no_grad():
        features, sampling = model.forward_sampling(torch.randn(1, 3, h, w))
    assert [tuple(f.shape[2:]) for f in features] == [(h // s, w // s) for s in (4, 8, 16, 32)]
    assert all(torch.isfinite(f).all() for f in features)
    assert [(s.stage, s.block) for s in sampling] == [(0, 1), (1, 1), (2, 1), (3, 0)]
    for s in sampling:
        stage = model.stages[s.stage].attns[s.block]
        groups, hk, wk = s.pos.shape[1:4]
        fmap_h, fmap_w = features[s.stage].shape[2:]
        k, st = stage.ksize, stage.stride
        assert (groups, hk, wk) == (
            stage.n_groups,
            (fmap_h + 2 * (k // 2) - k) // st + 1,
            (fmap_w + 2 * (k // 2) - k) // st + 1,
        )
        assert s.pos.abs().max() <= 1.0
        expected_x = (torch.arange(wk) + 0.5) / (wk - 1) * 2 - 1 if wk > 1 else torch.zeros(wk)
        torch.testing.assert_close(s.reference[0, 0, 0, :, 1], expected_x)


def test_no_offsets_sample_average_pooled_keys():
    model = nano(no_offs=[True] * 4).eval()
    attn = model.stages[1].attns[1]
    assert attn.rpe_table is None and not any(p.requires_grad for p in attn.conv_offset.parameters())
    seen = {}
    attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    attn.proj_k.register_forward_pre_hook(lambda m, args: seen.__setitem__("keys", args[0]))
    with torch.no_grad():
        _, sampling = model.forward_sampling(torch.randn(2, 3, 64, 96))
    x = seen["x"]
    pooled = F.avg_pool2d(x, attn.stride)
    assert x.shape[2:] == (8, 12) and pooled.shape[2:] == (4, 6)
    torch.testing.assert_close(seen["keys"], pooled.reshape(2, x.shape[1], 1, -1))
    torch.testing.assert_close(sampling[1].pos, sampling[1].reference)


@pytest.mark.parametrize(
    "pe",
    [
        dict(dwc_pes=[True] * 4),
        dict(log_cpb=[True] * 4),
        dict(use_pes=[False] * 4),
        dict(offset_range_factor=[2, 2, 2, 2]),
        dict(use_dwc_mlps=[False] * 4, layer_scale_values=[1e-5] * 4),
    ],
)
def test_block_variants_run(pe):
    model = nano(**pe)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fixed_position_table_refuses_other_sizes():
    model = nano(fixed_pes=[True] * 4)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    with pytest.raises(ValueError, match="fixed_pes"):
        model(torch.randn(1, 3, 64, 96))


def test_no_weight_decay_lists_position_tables():
    names = nano().no_weight_decay()
    assert names == {
        "stages.0.attns.1.rpe_table",
        "stages.1.attns.1.rpe_table",
        "stages.2.attns.1.rpe_table",
        "stages.3.attns.0.rpe_table",
    }


def test_invalid_architecture_errors_name_the_key():
    with pytest.raises(ValueError, match=r"groups=3 does not divide heads=2"):
        nano(groups=[1, 3, 1, 2])
    with pytest.raises(ValueError, match=r"stage_spec\[0\].*unknown block types \['L'\]"):
        nano(stage_spec=[["L", "D"], ["N", "D"], ["N", "D"], ["D"]])
    with pytest.raises(ValueError, match=r"model.depths\[1\]=2"):
        nano(stage_spec=[["N", "D"], ["D"], ["N", "D"], ["D"]])
    with pytest.raises(ValueError, match="dat_nano declares no pretrained weights"):
        timm.create_model("dat_nano", pretrained=True)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_loads_strictly_and_reproduces_outputs(tmp_path):
    source = nano().eval()
    path = tmp_path / "dat.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    torch.manual_seed(123)
    loaded = nano(checkpoint=str(path)).eval()
    x = torch.randn(1, 3, 32, 64)
    torch.testing.assert_close(loaded(x), source(x))


def test_checkpoint_with_other_head_names_num_classes_or_keeps_a_fresh_head(tmp_path):
    source = nano()
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(
        WeightsMismatchError, match=r"(?s)cls_head\.weight file \[4, 128\] vs model \[7, 128\].*model\.num_classes"
    ):
        nano(num_classes=7, checkpoint=str(tmp_path / "plain.pth"))
    model = nano(num_classes=7, checkpoint=str(tmp_path / "plain.pth"), checkpoint_strict=False)
    assert model.cls_head.weight.shape == (7, 128)
    torch.testing.assert_close(model.patch_proj[0].weight, source.patch_proj[0].weight)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save({"model": nano().state_dict()}, tmp_path / "nano.pth")
    with pytest.raises(WeightsMismatchError, match=r"shape mismatch: stages\.3\..* file \[128\] vs model \[256\]"):
        nano(dims=[16, 32, 64, 256], checkpoint=str(tmp_path / "nano.pth"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nano(checkpoint=str(tmp_path / "missing.pth"))


def test_position_tables_are_resized_bicubically_for_another_resolution(tmp_path):
    source = nano()
    torch.save({"model": source.state_dict()}, tmp_path / "64.pth")
    model = nano(img_size=96, checkpoint=str(tmp_path / "64.pth"))
    old = source.stages[0].attns[1].rpe_table.detach()
    new = model.stages[0].attns[1].rpe_table.detach()
    assert old.shape == (1, 31, 31) and new.shape == (1, 47, 47)
    torch.testing.assert_close(new, F.interpolate(old[None], size=(47, 47), mode="bicubic")[0])
    torch.testing.assert_close(model.stages[2].attns[0].rpb, source.stages[2].attns[0].rpb)
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["dat_tiny", "dat_small", "dat_base", "dat_nano"])
def test_model_config_mirrors_constructor_and_variant(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"]).model
    params = set(inspect.signature(dat.DAT).parameters)
    assert cfg._target_ == "das_lab.models.builder.create_model" and cfg.name == name
    assert set(cfg) - set(FACTORY_KEYS) == params - {"num_classes"}
    assert cfg.checkpoint is None and OmegaConf.to_container(cfg)["num_classes"] == "${data.num_classes}"
    # timm.create_model(name) builds from this same file: one source for the variant's sizes
    assert {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in FACTORY_KEYS} == variant_args(name)


def test_experiments_compose_and_nano_trains_a_step():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        imagenet = compose("train", overrides=["+experiment=imagenet_dat_tiny"])
        dogs = compose("train", overrides=["+experiment=dogs_dat_tiny"])
        digits = compose("train", overrides=["+experiment=digits_dat", "model.groups=[1,1,2,2]"])
    assert imagenet.model.dims == [64, 128, 256, 512] and imagenet.task.lr_reference_batch == 1024
    assert (
        imagenet.optimizer.lr == 1e-3 and imagenet.trainer.max_epochs == 300 and imagenet.scheduler.warmup_epochs == 20
    )
    assert dogs.model.checkpoint.endswith("dat_pp_tiny_in1k_224.pth") and dogs.data.num_classes == 120
    model = instantiate(digits.model)
    assert model.stages[2].attns[1].n_groups == 2 and model.num_classes == digits.data.num_classes
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 3]))
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
