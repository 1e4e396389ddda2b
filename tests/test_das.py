"""The DAS gate: shapes, range, gradients to the offsets, the zero-offset reference, validation."""

import pytest
import torch
import torch.nn.functional as F

from das_lab.models.das import DASGate, capture_gate_maps, stage_end_gates
from das_lab.utils.flops import count_gmacs


def _gate(**kwargs) -> DASGate:
    torch.manual_seed(0)
    return DASGate(32, **{"reduction": 0.5, **kwargs}).eval()


@pytest.mark.parametrize("gate_mode", ["multiply", "residual"])
def test_output_shape_and_gate_range(gate_mode):
    gate = _gate(gate_mode=gate_mode)
    x = torch.randn(2, 32, 9, 7)
    gate.record_maps = True
    out = gate(x)
    assert out.shape == x.shape
    maps = gate.last_maps
    assert maps.gate.shape == x.shape
    assert maps.gate.min() >= 0 and maps.gate.max() <= 1
    assert maps.offsets.shape == (2, 2 * 9, 9, 7) and maps.mask is None
    expected = x * maps.gate if gate_mode == "multiply" else x + x * maps.gate
    torch.testing.assert_close(out, expected)


def test_zero_offsets_reduce_to_plain_convolution():
    gate = _gate(norm="layer", act="gelu")
    x = torch.randn(2, 32, 8, 8)
    hidden = gate.act(gate.norm1(gate.pw(gate.dw(x))))
    reference = x * torch.sigmoid(gate.norm2(F.conv2d(hidden, gate.deform.weight, padding=1)))
    torch.testing.assert_close(gate(x), reference, rtol=1e-5, atol=1e-5)


def test_modulated_gate_starts_as_half_weighted_convolution():
    gate = _gate(modulated=True, offset_groups=2, norm="none")
    x = torch.randn(1, 32, 6, 6)
    hidden = gate.act(gate.pw(gate.dw(x)))
    reference = x * torch.sigmoid(0.5 * F.conv2d(hidden, gate.deform.weight, padding=1))
    gate.record_maps = True
    torch.testing.assert_close(gate(x), reference, rtol=1e-5, atol=1e-5)
    assert gate.last_maps.mask.shape == (1, 2 * 9, 6, 6)
    torch.testing.assert_close(gate.last_maps.mask, torch.full_like(gate.last_maps.mask, 0.5))


def test_gradient_reaches_offset_predictor_and_moves_sampling():
    gate = _gate(offset_groups=4).train()
    x = torch.randn(2, 32, 8, 8)
    gate(x).square().mean().backward()
    assert gate.offset.weight.grad.abs().sum() > 0
    assert gate.offset.bias.grad.abs().sum() > 0
    with torch.no_grad():
        before = gate(x)
        gate.offset.bias.normal_(0, 1.0)
        assert not torch.allclose(gate(x), before)


def test_offset_groups_each_get_their_own_offsets():
    gate = _gate(offset_groups=8)
    assert gate.offset.out_channels == 2 * 8 * 9
    with torch.no_grad():
        gate.offset.bias[: 2 * 9].fill_(1.5)  # shift only the first group's taps
    x = torch.randn(1, 32, 8, 8)
    gate.record_maps = True
    assert gate(x).shape == x.shape
    offsets = gate.last_maps.offsets
    assert torch.all(offsets[:, : 2 * 9] == 1.5) and torch.all(offsets[:, 2 * 9 :] == 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"offset_groups": 3}, r"model\.offset_groups=3 does not divide the gate's 16 hidden channels"),
        ({"reduction": 0.01}, r"model\.reduction=0\.01 leaves 0 hidden channels .* choose reduction >= 0\.03125"),
        ({"gate_mode": "add"}, r"model\.gate_mode='add' is not supported; choose one of multiply, residual"),
        ({"norm": "instance"}, r"model\.norm='instance' is not supported"),
        ({"act": "tanh"}, r"model\.act='tanh' is not supported; choose one of gelu, relu, silu"),
        ({"deform_kernel_size": 4}, r"model\.deform_kernel_size=4 must be a positive odd kernel size"),
    ],
)
def test_invalid_arguments_name_the_config_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DASGate(32, **{"reduction": 0.5, **kwargs})


def test_stage_gates_validate_stages_and_per_stage_groups():
    gates = stage_end_gates((16, 32, 64, 128), [2, 4], [1, 2, 1, 4], reduction=0.5)
    assert list(gates) == ["2", "4"]
    assert gates["2"].offset_groups == 2 and gates["4"].offset_groups == 4
    with pytest.raises(ValueError, match=r"model\.gate_stages=\[0, 2\] must be distinct stage numbers in 1\.\.4"):
        stage_end_gates((16, 32, 64, 128), [0, 2], 1, reduction=0.5)
    with pytest.raises(
        ValueError, match=r"model\.offset_groups=\[1, 2\] has 2 entries; give one int or one per stage \(4\)"
    ):
        stage_end_gates((16, 32, 64, 128), [2], [1, 2], reduction=0.5)


def test_capture_gate_maps_collects_every_gate_in_one_pass():
    net = torch.nn.Sequential(_gate(), torch.nn.Conv2d(32, 32, 3, padding=1), _gate())
    with capture_gate_maps(net) as maps:
        net(torch.randn(1, 32, 5, 5))
    assert sorted(maps) == ["0", "2"]
    assert all(m.gate.shape == (1, 32, 5, 5) for m in maps.values())
    assert not net[0].record_maps and net[0].last_maps is None


def test_flops_include_the_deformable_convolution():
    gate = _gate()  # 32 channels, 16 hidden, 3x3 kernels, on an 8x8 map
    pixels = 64
    convs = pixels * (32 * 9 + 32 * 16 + 16 * 18 * 9)  # depthwise, pointwise, offset predictor
    deform = pixels * (32 * 16 * 9 + 16 * 9 * 4)  # convolution + bilinear sampling
    assert count_gmacs(gate, (1, 32, 8, 8)) * 1e9 == pytest.approx(convs + deform)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_runs_under_cpu_autocast(dtype):
    """torchvision has no CPU autocast rule for deform_conv2d: the gate runs it in float32."""
    gate = DASGate(16)
    x = torch.randn(2, 16, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        out = gate(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.allclose(out.float(), gate(x), atol=0.05)


def test_torchvision_cpu_deform_conv_still_lacks_bf16():
    """Why the gate's float32 island exists; when torchvision gains the kernel, the island can go."""
    from torchvision.ops import deform_conv2d

    x, offsets, weight = torch.randn(1, 2, 4, 4), torch.zeros(1, 18, 4, 4), torch.randn(2, 2, 3, 3)
    with pytest.raises(RuntimeError, match="not implemented for 'BFloat16'"):
        deform_conv2d(x.bfloat16(), offsets.bfloat16(), weight.bfloat16(), padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="BFloat16"):
        deform_conv2d(x.bfloat16(), offsets, weight, padding=1)
