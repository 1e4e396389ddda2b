"""DAT++'s fused attention kernels (SDPA, flex_attention) against the reference path, fp32 on CPU."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from das_lab.models import neighborhood_attention as na
from das_lab.models.attention_impl import check_attn_impl, use_fused
from das_lab.models.dat import DAT, DeformableAttention

TOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def weighted_mean(out: torch.Tensor) -> torch.Tensor:
    """A loss that weighs every output differently, reduced by the mean as losses are (gradients of order 1)."""
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).mean()


def twins(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The module with the reference kernel and a copy with the same weights on the fused kernel."""
    fused = copy.deepcopy(module)
    for m in module.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl = "reference"
    for m in fused.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl = "fused"
    return module, fused


def assert_same_training_step(reference: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    """Outputs, input gradients and every parameter gradient agree within TOL."""
    grads = []
    for module in (reference, fused):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        out = out[0] if isinstance(out, tuple) else out
        weighted_mean(out).backward()
        grads.append((out.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (out_r, gx_r, gp_r), (out_f, gx_f, gp_f) = grads
    assert max_diff(out_r, out_f) <= TOL
    assert max_diff(gx_r, gx_f) <= TOL
    assert gp_r.keys() == gp_f.keys() and gp_r
    assert {n: max_diff(gp_r[n], gp_f[n]) for n in gp_r if max_diff(gp_r[n], gp_f[n]) > TOL} == {}


# ---------------------------------------------------------------- deformable attention (SDPA)


@pytest.mark.parametrize("pe", ["table", "log_cpb", "dwc_pe", "none"])
def test_deformable_attention_sdpa_equals_reference_with_gradients(pe):
    torch.manual_seed(0)
    module = DeformableAttention(
        (6, 10),
        n_heads=4,
        n_head_channels=4,
        n_groups=2,
        attn_drop=0.0,
        proj_drop=0.0,
        stride=2,
        offset_range_factor=-1,
        use_pe=pe != "none",
        dwc_pe=pe == "dwc_pe",
        no_off=False,
        fixed_pe=False,
        ksize=3,
        log_cpb=pe == "log_cpb",
    )
    reference, fused = twins(module)
    x = torch.randn(2, 16, 6, 10)
    assert_same_training_step(reference, fused, x)
    if pe == "table":
        assert reference.rpe_table.grad.abs().sum() > 0 and fused.rpe_table.grad.abs().sum() > 0
    with torch.no_grad():  # inference takes SDPA's fused CPU kernel (the mask needs no gradient)
        assert max_diff(reference(x)[0], fused(x)[0]) <= TOL


# ---------------------------------------------------------------- neighborhood attention (flex_attention)


def dense_flex_attention(q, k, v, rpb, kernel_size):
    """flex_attention's definition evaluated densely: scores + score_mod, mask_mod outside -> -inf, softmax."""
    heads, height, width = q.shape[1:4]
    idx = torch.arange(height * width)
    q_idx, kv_idx = idx[:, None], idx[None, :]
    allowed = na.window_mask_mod(height, width, kernel_size)(0, 0, q_idx, kv_idx)
    score_mod = na.rpb_score_mod(rpb, width, kernel_size)
    bias = torch.stack([score_mod(torch.zeros(()), 0, torch.tensor(h), q_idx, kv_idx) for h in range(heads)])
    mask = bias.masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), attn_mask=mask, scale=1.0)
    return out.unflatten(2, (height, width))


@pytest.mark.parametrize("size,kernel", [((9, 10), 7), ((4, 6), 7), ((8, 5), 3)])
def test_flex_window_and_bias_give_reference_outputs_and_gradients(size, kernel):
    """The block mask (borders clamped inwards, windows clamped to small maps) and the bias score_mod, with gradients.

    torch 2.14 has no flex_attention backward on CPU, so gradients are checked on flex_attention's
    definition evaluated densely with the same mask_mod/score_mod; the compiled kernel's forward is
    checked below.
    """
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(2, 3, *size, 4, generator=gen) for _ in range(3)]
    rpb = torch.randn(3, 2 * kernel - 1, 2 * kernel - 1, generator=gen)
    results = []
    for attend in (na.neighborhood_attention, dense_flex_attention):
        leaves = [t.clone().requires_grad_(True) for t in (*tensors, rpb)]
        out = attend(*leaves, kernel)
        weighted_mean(out).backward()
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    for ref, flex in zip(*results):
        assert max_diff(ref, flex) <= TOL
    assert results[1][-1].abs().sum() > 0  # the bias table receives a gradient through score_mod


def tiny_dat(stage_spec, depths, attn_impl="reference"):
    torch.manual_seed(0)
    return DAT(
        dim_stem=8,
        dims=[8, 8, 16, 16],
        depths=depths,
        heads=[1, 2, 2, 4],
        stage_spec=stage_spec,
        groups=[1, 1, 2, 2],
        strides=[4, 2, 1, 1],
        img_size=32,
        num_classes=3,
        attn_impl=attn_impl,
    )


def test_compiled_flex_block_and_whole_model_equal_reference_in_inference():
    """One compiled shape: a 1-head 8x16 map (border windows, non-square), alone and inside a tiny DAT++."""
    torch.manual_seed(0)
    block = na.NeighborhoodAttention2D(8, 7, 1)
    reference, fused = twins(block)
    x = torch.randn(1, 8, 8, 16)
    with torch.no_grad():
        assert max_diff(reference(x), fused(x)) <= TOL
    model = tiny_dat([["N", "D"], ["D"], ["D"], ["D"]], [2, 1, 1, 1]).eval()
    reference, fused = twins(model)
    image = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        assert max_diff(reference(image), fused(image)) <= TOL
        assert max_diff(reference.forward_features(image), fused.forward_features(image)) <= TOL


def test_fused_neighborhood_attention_inside_a_compiled_model():
    """task.compile traces flex_attention into the model's graph (aot_eager: no code generation in the test)."""
    torch.manual_seed(0)
    reference, fused = twins(na.NeighborhoodAttention2D(8, 7, 1).eval())
    x = torch.randn(1, 8, 8, 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. dynamo tracing through a cache wrapper
        assert max_diff(reference(x), torch.compile(fused, backend="aot_eager")(x)) <= TOL


def test_whole_dat_training_step_equal_under_both_paths():
    """A tiny DAT++ with neighborhood and deformable blocks trains alike on both paths: on CPU the fused
    neighborhood attention is flex_attention's forward with the banded backward, the deformable one SDPA."""
    reference, fused = twins(tiny_dat([["N", "D"], ["D"], ["D"], ["D"]], [2, 1, 1, 1]).train())
    assert_same_training_step(reference, fused, torch.randn(1, 3, 32, 64))


@pytest.mark.parametrize("size,kernel", [((9, 10), 7), ((4, 6), 7), ((8, 5), 3), ((15, 7), 5)])
def test_banded_backward_gives_the_reference_gradients(size, kernel):
    """Every band of query rows, its key rows at the borders, small maps and no bias: the gather's gradients."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, *size, 4, generator=gen) for _ in range(3))
    grad_out = torch.randn(2, 3, *size, 4, generator=gen)
    for rpb in (torch.randn(3, 2 * kernel - 1, 2 * kernel - 1, generator=gen), None):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rpb) if t is not None]
        out = na.neighborhood_attention(*leaves[:3], leaves[3] if rpb is not None else None, kernel)
        expected = torch.autograd.grad(out, leaves, grad_out)
        banded = [g for g in na.na2d_backward_by_bands(q, k, v, rpb, kernel, grad_out) if g is not None]
        assert len(banded) == len(expected)
        assert max(max_diff(a, b) for a, b in zip(expected, banded)) <= TOL


def test_fused_neighborhood_training_under_cpu_bf16_autocast():
    """The banded backward recomputes under the forward's autocast state (bf16 matmuls, fp32 bias and softmax)."""
    torch.manual_seed(0)
    reference, fused = twins(na.NeighborhoodAttention2D(8, 7, 1).train())
    x = torch.randn(1, 8, 8, 16)
    results = []
    for module in (reference, fused):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(xi)
        weighted_mean(out.float()).backward()
        results.append((out.detach().float(), xi.grad, module.rpb.grad, module.qkv.weight.grad))
    assert results[1][0].dtype == torch.float32 and results[1][3].dtype == torch.float32
    for ref, fus in zip(*results):
        assert max_diff(ref, fus) <= 1e-2 * max(1.0, ref.abs().max().item())


def saved_bytes(fn, *inputs: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn(*inputs)`` runs (storage counted once)."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())


def test_fused_neighborhood_training_keeps_no_windows_for_backward():
    """The reference keeps every query's gathered keys and values (kernel**2 x the map); fused keeps its inputs."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 8, 16, 8, generator=gen, requires_grad=True) for _ in range(3))
    rpb = torch.randn(1, 13, 13, generator=gen, requires_grad=True)
    inputs = sum(t.numel() * 4 for t in (q, k, v, rpb))
    reference = saved_bytes(lambda *a: na.neighborhood_attention(*a, 7, fused=False), q, k, v, rpb)
    fused = saved_bytes(lambda *a: na.neighborhood_attention(*a, 7, fused=True), q, k, v, rpb)
    assert fused == inputs
    assert reference > 40 * q.numel() * 4


# ---------------------------------------------------------------- choosing the kernel


def test_auto_takes_fused_kernels_on_cuda_only_and_reference_under_attention_dropout():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_fused("auto", cuda, dropout_active=False) and not use_fused("auto", cpu, dropout_active=False)
    assert not use_fused("auto", cuda, dropout_active=True)
    assert use_fused("fused", cpu, dropout_active=False) and not use_fused("reference", cuda, dropout_active=False)
    with pytest.raises(ValueError, match="attn_drop_rate"):
        use_fused("fused", cuda, dropout_active=True)


def test_unusable_fused_choices_name_the_fix():
    with pytest.raises(ValueError, match=r"model.attn_impl='flash' is not one of \['auto', 'reference', 'fused'\]"):
        check_attn_impl("flash")
    with pytest.raises(ValueError, match="model.attn_impl"):
        timm.create_model("dat_nano", attn_impl="flex")


def test_attn_impl_changes_no_parameter():
    keys = {
        impl: {
            k: v.shape for k, v in tiny_dat([["N", "D"], ["D"], ["D"], ["D"]], [2, 1, 1, 1], impl).state_dict().items()
        }
        for impl in ("reference", "fused")
    }
    assert keys["reference"] == keys["fused"]
