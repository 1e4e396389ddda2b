"""task.compile and task.channels_last: same numbers as eager NCHW, one deform_conv2d op, CLI run."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from timm.optim import create_optimizer_v2
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.decomposition import select_decomp_table

import das_lab.models  # noqa: F401  (registers das-lab's backbones in timm)
from cli_helpers import TINY, read_metrics, run_cli, run_dirs
from das_lab.models.das import DASGate
from das_lab.tasks import speed
from das_lab.tasks.classification import ClassificationModule
from das_lab.tasks.detection import DetectionModule

SGD = partial(create_optimizer_v2, opt="sgd", lr=0.1, momentum=0.9)


def tiny_net(seed: int = 0, **kwargs) -> torch.nn.Module:
    """The tiny DAS-ResNet (DAS gates after stages 2 and 3, so deform_conv2d is inside), seeded."""
    torch.manual_seed(seed)
    return timm.create_model("das_resnet_tiny", **{"num_classes": 10, **kwargs})


def batch(size: int = 32, count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, 3, size, size, generator=generator), torch.randint(0, 10, (count,), generator=generator)


def offsets_learned(net: torch.nn.Module) -> None:
    """Non-zero offsets (they start at zero), so the deformable sampling is really exercised."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for gate in (m for m in net.modules() if isinstance(m, DASGate)):
            gate.offset.weight.copy_(0.1 * torch.randn(gate.offset.weight.shape, generator=generator))


def test_channels_last_gives_the_same_outputs_and_gradients_and_keeps_weight_names() -> None:
    eager, fast = tiny_net(), tiny_net()
    offsets_learned(eager)
    fast.load_state_dict(eager.state_dict())
    ClassificationModule(fast, SGD, channels_last=True)
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(fast.state_dict()) == list(eager.state_dict())
    seen = []
    fast.conv1.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    images, targets = batch()
    losses = [F.cross_entropy(net(images), targets) for net in (eager, fast)]
    assert seen == [True]  # a plain NCHW batch reaches the first convolution in channels-last layout
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(eager.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=name)  # grads up to ~3


def test_detection_applies_the_options_to_its_fpn_backbone() -> None:
    detectors = [
        DetectionModule(
            tiny_net(num_classes=0),
            SGD,
            None,
            "faster_rcnn",
            3,
            min_size=64,
            max_size=96,
            fpn_channels=16,
            box_head_dim=32,
            channels_last=channels_last,
        )
        for channels_last in (False, True)
    ]
    eager, fast = (d.detector.backbone.eval() for d in detectors)
    fast.load_state_dict(eager.state_dict())
    assert fast.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images, _ = batch(64, 2)
    with torch.no_grad():
        for level, (a, b) in enumerate(zip(eager(images).values(), fast(images).values())):
            assert b.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"FPN level {level}")


def graphs_seen_by_inductor(module: torch.nn.Module, x: torch.Tensor) -> tuple[list, list]:
    """Forward and backward ATen graphs of ``module`` after the decompositions TorchInductor applies."""
    forward, backward = [], []

    def keep(graphs: list):
        def compiler(graph: torch.fx.GraphModule, example_inputs: list):
            graphs.append(graph)
            return make_boxed_func(graph.forward)

        return compiler

    backend = aot_autograd(fw_compiler=keep(forward), bw_compiler=keep(backward), decompositions=select_decomp_table())
    torch._dynamo.reset()
    torch.compile(module, backend=backend, fullgraph=True)(x).sum().backward()
    return forward, backward


def ops(graphs: list) -> list:
    return [node.target for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]


def test_compile_keeps_deform_conv2d_one_operator_without_graph_breaks() -> None:
    torch.manual_seed(0)
    gate = DASGate(8, reduction=0.5)
    forward, backward = graphs_seen_by_inductor(
        gate, torch.randn(2, 8, 6, 6, requires_grad=True)
    )  # fullgraph: no breaks
    assert ops(forward).count(torch.ops.torchvision.deform_conv2d.default) == 1
    assert ops(backward).count(torch.ops.torchvision._deform_conv2d_backward.default) == 1


class GatedStem(nn.Module):
    """The smallest classifier with a DAS gate: TorchInductor's CPU code generation costs seconds per kernel."""

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.gate = DASGate(8, reduction=0.5)
        self.fc = nn.Linear(8, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(self.stem(x)).mean((2, 3)))


def test_compiled_training_steps_give_the_eager_losses() -> None:
    assert speed.any_c_compiler(), "TorchInductor needs a C compiler on this machine (cc, gcc or clang)"
    torch.manual_seed(0)
    modules = [ClassificationModule(GatedStem(), SGD, compile=compiled) for compiled in (False, True)]
    offsets_learned(modules[0].net)
    modules[1].net.load_state_dict(modules[0].net.state_dict())
    assert list(modules[1].state_dict()) == list(modules[0].state_dict())  # checkpoints stay interchangeable
    torch._dynamo.reset()
    losses = {0: [], 1: []}
    for index, module in enumerate(modules):
        optimizer = SGD(module.net)
        images, targets = batch()
        for _ in range(3):
            loss = module.criterion(module(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[index].append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)
    assert losses[0][2] < losses[0][0]  # the steps train: the comparison is not of a constant


def test_compile_without_a_c_compiler_or_with_an_unknown_backend_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="task.compile_backend='inductr' is not a torch.compile backend.*inductor"):
        ClassificationModule(tiny_net(), SGD, compile=True, compile_backend="inductr")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="task.compile=true needs a C compiler.*task.compile=false"):
        ClassificationModule(tiny_net(), SGD, compile=True)
    ClassificationModule(tiny_net(), SGD, compile=True, compile_backend="aot_eager")  # generates no C code


def test_cli_trains_with_compile_and_channels_last(tmp_path: Path) -> None:
    # TorchInductor's code generation for the whole tiny DAS-ResNet takes minutes on 2 CPU cores: here
    # aot_eager captures and runs the same forward and backward graphs (inductor: the test above)
    overrides = [*TINY, "task.compile=true", "task.compile_backend=aot_eager", "task.channels_last=true"]
    done = run_cli(["train", *overrides], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed"
    assert 0.0 < metrics["final"]["train/loss"] < 10.0
    assert 0.0 <= metrics["final"]["test/acc1"] <= 1.0
    assert metrics["params"] == sum(p.numel() for p in tiny_net().parameters())  # the default das_resnet_tiny
