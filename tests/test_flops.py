"""The FLOP counter counts deformable convolution, grid sampling and CPU attention exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from torchvision.ops import deform_conv2d

from das_lab.models.das import DASGate
from das_lab.models.dat import DeformableAttention
from das_lab.utils.flops import count_flops, count_gmacs, count_params


def _counts(fn) -> dict:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_flop_counts()["Global"]


@pytest.mark.parametrize("use_mask", [False, True])
def test_deform_conv2d_counts_conv_sampling_and_modulation(use_mask):
    x, weight = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    offset = torch.randn(1, 18, 4, 4)
    mask = torch.rand(1, 9, 4, 4) if use_mask else None
    counts = _counts(lambda: deform_conv2d(x, offset, weight, padding=1, mask=mask))
    positions, taps = 16, 9
    conv = positions * 3 * 2 * taps  # out x in x kernel MACs per output position
    sampling = positions * 2 * taps * 4  # four bilinear weights per sampled input value
    modulation = positions * 2 * taps if use_mask else 0
    assert counts == {torch.ops.torchvision.deform_conv2d: 2 * (conv + sampling + modulation)}


def test_grid_sample_counts_four_macs_per_output_value():
    counts = _counts(lambda: F.grid_sample(torch.randn(2, 3, 5, 5), torch.rand(2, 4, 6, 2) * 2 - 1, align_corners=True))
    assert counts == {torch.ops.aten.grid_sampler_2d: 2 * 2 * 3 * 4 * 6 * 4}


def test_cudnn_grid_sampler_has_the_same_formula():
    """On CUDA, F.grid_sample runs cudnn_grid_sampler for DAT++'s settings; it must not go uncounted."""
    inp, grid = torch.empty(2, 3, 5, 5, device="meta"), torch.empty(2, 4, 6, 2, device="meta")
    formula = flop_registry[torch.ops.aten.cudnn_grid_sampler]
    assert formula(inp, grid, out_val=torch.empty(2, 3, 4, 6, device="meta")) == 2 * 2 * 3 * 4 * 6 * 4


def test_cpu_scaled_dot_product_attention_is_counted_forward_and_backward():
    q = torch.randn(1, 2, 10, 8, requires_grad=True)
    kv = torch.randn(1, 2, 6, 8, requires_grad=True)
    counts = _counts(lambda: F.scaled_dot_product_attention(q, kv, kv).sum().backward())
    forward = 2 * (2 * 10 * 6 * 8) * 2  # q.k^T and attn.v, 2 heads
    assert counts[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] == forward
    assert counts[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] == 2.5 * forward


def test_das_gate_total_is_its_convolutions_plus_deformable_sampling():
    gate = DASGate(4, reduction=0.5)  # hidden 2, 3x3 kernels, one offset group
    n, c, h, k = 6 * 6, 4, 2, 9
    macs = (
        n * c * k  # depthwise 3x3
        + n * c * h  # pointwise C -> hidden
        + n * 18 * h * k  # offset predictor hidden -> 2*9
        + n * c * h * k
        + n * h * k * 4  # deformable conv hidden -> C and its bilinear sampling
    )
    assert count_flops(gate, (1, 4, 6, 6)) == 2 * macs
    assert count_gmacs(gate, (1, 4, 6, 6)) == pytest.approx(macs / 1e9)


def test_dat_deformable_attention_counts_both_grid_samples():
    attn = DeformableAttention(
        (8, 8),
        n_heads=2,
        n_head_channels=4,
        n_groups=1,
        attn_drop=0.0,
        proj_drop=0.0,
        stride=2,
        offset_range_factor=-1.0,
        use_pe=True,
        dwc_pe=False,
        no_off=False,
        fixed_pe=False,
        ksize=3,
        log_cpb=False,
    )
    counts = _counts(lambda: attn(torch.randn(1, 8, 8, 8)))
    keys = 4 * 4
    key_sampling = 8 * keys * 4  # 8 channels at 16 sampled keys
    bias_sampling = 2 * 64 * keys * 4  # 2 heads' bias tables at 64 queries x 16 keys
    assert counts[torch.ops.aten.grid_sampler_2d] == 2 * (key_sampling + bias_sampling)


def test_count_flops_runs_on_meta_and_restores_training_mode():
    with torch.device("meta"):
        gate = DASGate(4, reduction=0.5)
    gate.train()
    assert count_flops(gate, (1, 4, 6, 6), device="meta") == count_flops(DASGate(4, reduction=0.5), (1, 4, 6, 6))
    assert gate.training
    assert count_params(gate) == sum(p.numel() for p in DASGate(4, reduction=0.5).parameters())


def real_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """The count of an eval-mode pass on a real zero image: what the fake-tensor pass must match."""
    model.eval()
    with torch.no_grad():
        return _counts(lambda: model(torch.zeros(shape)))


@pytest.mark.parametrize(
    "name,attn_impl",
    [("das_resnet_tiny", None), ("das_mobilenet_v2", None), ("dat_nano", "reference"), ("dat_nano", "fused")],
)
def test_counting_on_fake_tensors_equals_a_real_pass(name, attn_impl):
    """Shapes decide every formula, so the shape-only pass (seconds for a 2048x512 segmentor) counts the same;
    DAT++'s fused kernels are counted as the reference's (the papers' count); models are left usable."""
    import timm

    import das_lab.models  # noqa: F401  (registers the backbones)

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **({"attn_impl": attn_impl} if attn_impl else {}))
    reference = timm.create_model(name, num_classes=10, **({"attn_impl": "reference"} if attn_impl else {}))
    assert count_flops(model.train(), (1, 3, 64, 64)) == sum(real_flops(reference, (1, 3, 64, 64)).values())
    assert model.training
    if attn_impl != "fused":  # (a fused forward would compile flex_attention: tested in test_dat_attention.py)
        with torch.no_grad():
            assert torch.isfinite(model.eval()(torch.randn(1, 3, 64, 64))).all()


def test_a_value_dependent_forward_is_counted_on_a_real_image():
    class ValueBranch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y[y > 0]  # output size depends on the values: fake tensors cannot run it

    assert count_flops(ValueBranch(), (1, 3, 8, 8)) == 2 * 4 * 3 * 9 * 36


def test_the_das_gate_still_stops_on_non_finite_offsets_after_a_fake_count():
    from das_lab.errors import NonFiniteError

    gate = DASGate(4, reduction=0.5)
    count_flops(gate, (1, 4, 6, 6))
    with torch.no_grad():
        gate.offset.bias.fill_(float("nan"))
        with pytest.raises(NonFiniteError):
            gate(torch.randn(1, 4, 6, 6))
