"""``das-lab profile``: what models cost on this machine, and how attention layers scale with resolution.

Model table (``model=NAME`` or ``profile.compare=[A,B,...]``): parameters, GMACs at batch 1
(the "GFLOPs" of papers, counted by :mod:`das_lab.utils.flops`), forward and forward+backward
throughput at ``profile.batch_size`` (median of ``profile.repeats`` timed passes after
``profile.warmup``), and the peak tensor memory one pass allocates beyond the model and its
input (CUDA: ``torch.cuda.max_memory_allocated``; CPU: allocations recorded by
``torch.profiler``; measured by :mod:`das_lab.utils.timing`). With several models, ratios to the
first one are added. With a task (``task=segmentation`` or a segmentation experiment) each row is
what the task declares: the whole segmentor (decode and auxiliary heads in the params) on images
of the test scale, 2048x512 (width x height) as mmseg's papers count "FLOPs"; the GFLOPs column
names that size.

Resolution curve (``profile.resolutions=[...]``): three single layers of ``profile.layer_width``
channels on a map of side ``resolution / profile.layer_stride`` -- the DAS gate (DASGate defaults),
DAT++'s deformable attention (the stage-1 settings of ``conf/model/dat_tiny.yaml``: key stride 8,
offset kernel 9, one offset group, position bias table) and a plain global multi-head
self-attention with the same 1x1 projections. GMACs are counted on the meta device (nothing is allocated, any size is affordable);
points up to ``profile.timing_limit_gmacs`` are also timed at batch 1.
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from das_lab.command import Outcome, Run, run_command
from das_lab.config import config_dir
from das_lab.errors import UserError
from das_lab.models.builder import compose_model_config, variant_args
from das_lab.models.das import DASGate
from das_lab.models.dat import DeformableAttention
from das_lab.pipeline import build_module
from das_lab.utils.flops import cost_subject, count_flops, count_params
from das_lab.utils.tables import markdown_table, measured, write_csv
from das_lab.utils.timing import (
    backward_step,
    example_input,
    forward_step,
    median_seconds,
    peak_memory_mib,
    precision_dtype,
    resolve_device,
)

# ----------------------------------------------------------------------------- the model table


@dataclass
class ModelCost:
    """One row of the model table."""

    model: str
    params_m: float
    gflops: float
    fwd_img_s: float
    train_img_s: float
    fwd_peak_mib: float
    train_peak_mib: float


def measure_model(
    name: str,
    model: nn.Module,
    input_size: tuple[int, int],
    batch_size: int,
    device: torch.device,
    *,
    precision: str = "fp32",
    channels_last: bool = False,
    warmup: int = 2,
    repeats: int = 5,
) -> ModelCost:
    """Params, GMACs (batch 1, fp32) and throughput/peak memory at ``batch_size`` of one model on (height, width) inputs."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    gflops = count_flops(model, (1, 3, *input_size), device=device) / 2e9
    x = example_input((batch_size, 3, *input_size), device, channels_last)
    try:
        model.eval()
        forward = forward_step(model, x, precision)
        fwd_s = median_seconds(forward, device, warmup, repeats)
        fwd_mib = peak_memory_mib(forward, device)
        model.train()
        train = backward_step(model, x, precision)
        train_s = median_seconds(train, device, warmup, repeats)
        model.zero_grad(set_to_none=True)
        train_mib = peak_memory_mib(train, device)
    except ValueError as error:  # e.g. BatchNorm of a segmentor's pooled 1x1 maps in a training pass of one image
        raise UserError(
            f"{name} does not run at profile.batch_size={batch_size} ({str(error).splitlines()[0]}); "
            "use profile.batch_size=2 or more"
        ) from error
    except RuntimeError as error:
        if precision == "fp32":
            raise
        raise UserError(
            f"{name} does not run under {precision} autocast on {device.type} "
            f"({str(error).splitlines()[0]}); use profile.precision=fp32 or another device"
        ) from error
    finally:
        model.zero_grad(set_to_none=True)
    return ModelCost(
        name, count_params(model) / 1e6, gflops, batch_size / fwd_s, batch_size / train_s, fwd_mib, train_mib
    )


# ----------------------------------------------------------------------------- resolution curve


class GlobalSelfAttention(nn.Module):
    """Multi-head self-attention of every pixel over all pixels: the O(n^2) reference of the curve."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise UserError(
                f"profile.layer_heads={heads} does not divide profile.layer_width={channels}; choose a divisor"
            )
        self.heads = heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(x).reshape(batch, 3, self.heads, channels // self.heads, height * width)
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(-1, -2).reshape(batch, channels, height, width))


CURVE_DAT_VARIANT = "dat_tiny"  # the curve's deformable attention has this variant's stage-1 settings


@functools.cache
def _dat_stage1() -> dict[str, Any]:
    """Stage 1's entry of every per-stage setting of ``conf/model/<CURVE_DAT_VARIANT>.yaml``."""
    return {key: value[0] for key, value in variant_args(CURVE_DAT_VARIANT).items() if isinstance(value, list)}


def _deformable_attention(width: int, heads: int, side: int) -> nn.Module:
    if width % heads:
        raise UserError(f"profile.layer_heads={heads} does not divide profile.layer_width={width}; choose a divisor")
    stage = _dat_stage1()
    return DeformableAttention(
        (side, side),
        n_heads=heads,
        n_head_channels=width // heads,
        n_groups=stage["groups"],
        attn_drop=0.0,
        proj_drop=0.0,
        stride=stage["strides"],
        offset_range_factor=stage["offset_range_factor"],
        use_pe=stage["use_pes"],
        dwc_pe=stage["dwc_pes"],
        no_off=stage["no_offs"],
        fixed_pe=stage["fixed_pes"],
        ksize=stage["ksizes"],
        log_cpb=stage["log_cpb"],
    )


CURVE_LAYERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "das_gate": lambda width, heads, side: DASGate(width),
    "dat_deformable_attention": _deformable_attention,
    "global_attention": lambda width, heads, side: GlobalSelfAttention(width, heads),
}


@dataclass
class CurvePoint:
    """Cost of one layer at one input resolution."""

    layer: str
    resolution: int
    map_side: int
    tokens: int
    gflops: float
    ms: Optional[float]
    peak_mib: Optional[float]
    note: str


def resolution_curve(
    resolutions: Sequence[int],
    width: int,
    stride: int,
    heads: int,
    device: torch.device,
    timing_limit_gmacs: float,
    *,
    warmup: int = 2,
    repeats: int = 5,
) -> list[CurvePoint]:
    """Counted GMACs of every curve layer at every resolution, timed where under the limit."""
    points = []
    for resolution in resolutions:
        if resolution % stride or resolution < stride:
            raise UserError(
                f"profile.resolutions entry {resolution} is not a multiple of profile.layer_stride={stride}; "
                f"use multiples such as {stride * 28}"
            )
        side = resolution // stride
        shape = (1, width, side, side)
        for name, build in CURVE_LAYERS.items():
            with torch.device("meta"):
                counted = build(width, heads, side)
            gflops = count_flops(counted, shape, device="meta") / 2e9
            ms = peak = None
            note = ""
            if gflops <= timing_limit_gmacs:
                torch.manual_seed(0)
                layer = build(width, heads, side).to(device).eval()
                forward = forward_step(layer, example_input(shape, device), "fp32")
                ms = 1000 * median_seconds(forward, device, warmup, repeats)
                peak = peak_memory_mib(forward, device)
            else:
                note = f"not timed: {gflops:.1f} GMACs > profile.timing_limit_gmacs.{device.type}={timing_limit_gmacs}"
            points.append(CurvePoint(name, resolution, side, side * side, gflops, ms, peak, note))
    return points


def growth_exponent(points: Sequence[CurvePoint], layer: str) -> float:
    """Least-squares slope of log GMACs over log pixels: 1 is linear, 2 quadratic in the pixel count."""
    pairs = [(math.log(p.tokens), math.log(p.gflops)) for p in points if p.layer == layer]
    if len(pairs) < 2:
        return math.nan
    mx = statistics.fmean(x for x, _ in pairs)
    my = statistics.fmean(y for _, y in pairs)
    return sum((x - mx) * (y - my) for x, y in pairs) / sum((x - mx) ** 2 for x, _ in pairs)


def plot_curve(points: Sequence[CurvePoint], path: Path, title: str) -> None:
    """Log-log plot of GMACs (left) and measured time (right) against input resolution."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2))
    cost_axes, time_axes = figure.subplots(1, 2)
    for layer in CURVE_LAYERS:
        mine = [p for p in points if p.layer == layer]
        label = f"{layer} (~pixels^{growth_exponent(points, layer):.2f})"
        cost_axes.plot([p.resolution for p in mine], [p.gflops for p in mine], "o-", label=label)
        timed = [p for p in mine if p.ms is not None]
        time_axes.plot([p.resolution for p in timed], [p.ms for p in timed], "o-", label=layer)
    resolutions = sorted({p.resolution for p in points})
    for axes, ylabel in ((cost_axes, "GMACs (batch 1)"), (time_axes, "forward time (ms, batch 1)")):
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xticks(resolutions, [str(r) for r in resolutions])
        axes.minorticks_off()
        axes.set_xlabel("input resolution (px)")
        axes.set_ylabel(ylabel)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    time_axes.set_title("measured (untimed points omitted)", fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


RATIOS = {"params_m": "params_x", "gflops": "gflops_x", "fwd_img_s": "fwd_img_s_x", "train_img_s": "train_img_s_x"}


def with_ratios(costs: Sequence[ModelCost]) -> list[dict[str, Any]]:
    """Rows of the model table with each figure's ratio to the first model."""
    first = costs[0]
    rows = []
    for cost in costs:
        row = asdict(cost)
        row.update({ratio: getattr(cost, key) / getattr(first, key) for key, ratio in RATIOS.items()})
        rows.append(row)
    return rows


MODEL_HEADER = ("model", "params (M)", "GFLOPs", "fwd img/s", "fwd+bwd img/s", "fwd peak MiB", "fwd+bwd peak MiB")
GFLOPS_COLUMN = MODEL_HEADER.index("GFLOPs")
RATIO_HEADER = ("params x", "GFLOPs x", "fwd img/s x", "fwd+bwd img/s x")


def model_config(cfg: DictConfig, name: str) -> DictConfig:
    """conf/model/<name>.yaml placed in a copy of ``cfg`` so its ``${data...}`` references resolve."""
    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise UserError(f"profile.compare entry {name!r} has no config {path}; choose from: {available}")
    composed = copy.deepcopy(cfg)
    with open_dict(composed):
        composed.model = compose_model_config(name)  # with the base config it extends
    return composed.model


# ----------------------------------------------------------------------------- the command


def profiled_network(cfg: DictConfig, model_cfg: DictConfig) -> tuple[nn.Module, Optional[tuple[int, int]]]:
    """The network a model config is profiled as, and its (height, width) input: with ``task`` set, what the task
    declares (a whole segmentor at its test scale), else the model on square ``profile.image_size`` inputs."""
    image_size = cfg.profile.image_size
    if cfg.get("task") is None:
        return instantiate(model_cfg), (int(image_size), int(image_size)) if image_size else None
    net, module = build_module(model_cfg, cfg.task, None, None)
    return cost_subject(net, module, int(image_size) if image_size else None)


def profile(cfg: DictConfig, run: Run) -> Outcome:
    """Print the model table (and the resolution curve) and write them to the run folder."""
    out_dir = run.dir
    settings = cfg.profile
    device = resolve_device(str(settings.device), option="profile.device")
    precision_dtype(str(settings.precision), option="profile.precision")
    if int(settings.repeats) < 1:
        raise UserError(f"profile.repeats={settings.repeats}: need at least one timed pass")
    batch = int(settings.batch_size)
    chosen = HydraConfig.get().runtime.choices.get("model", "model")
    configs = {str(name): model_config(cfg, str(name)) for name in settings.compare} or {chosen: cfg.model}
    network, input_size = profiled_network(cfg, next(iter(configs.values())))
    if input_size is None:
        raise UserError(
            f"profile.image_size is not set (data={HydraConfig.get().runtime.choices.get('data')} has no "
            "image_size); set profile.image_size=<pixels>, e.g. profile.image_size=224"
        )
    height, width = input_size
    with_task = cfg.get("task") is not None  # inputs need not be square: say which size the GFLOPs count
    shown_size = f"{width}x{height} (width x height)" if with_task else f"{height}px"
    run.start()
    print(
        f"das-lab profile on {device} ({torch.get_num_threads()} threads), {shown_size}, batch {batch}, "
        f"{settings.precision}{', channels_last' if settings.channels_last else ''}; "
        f"median of {settings.repeats} after {settings.warmup} warm-up; GFLOPs = GMACs at batch 1",
        flush=True,
    )
    costs = []
    for name, config in configs.items():
        if network is None:  # one network alive at a time
            network, input_size = profiled_network(cfg, config)
        costs.append(
            measure_model(
                name,
                network,
                input_size,
                batch,
                device,
                precision=str(settings.precision),
                channels_last=bool(settings.channels_last),
                warmup=int(settings.warmup),
                repeats=int(settings.repeats),
            )
        )
        network = None
    rows = with_ratios(costs)
    compare = len(rows) > 1
    keys = [f.name for f in fields(ModelCost)] + (list(RATIOS.values()) if compare else [])
    header = list(MODEL_HEADER) + (list(RATIO_HEADER) if compare else [])
    if with_task:
        header[GFLOPS_COLUMN] = f"GFLOPs @{width}x{height}"
    print(
        markdown_table(header, [measured([row[k] for k in keys]) for row in rows], align="l" + "r" * (len(header) - 1)),
        flush=True,
    )
    files = [out_dir / "profile.csv"]
    write_csv(files[0], keys, ([row[k] for k in keys] for row in rows))

    if settings.resolutions:
        limits = OmegaConf.to_container(settings.timing_limit_gmacs)
        points = resolution_curve(
            [int(r) for r in settings.resolutions],
            int(settings.layer_width),
            int(settings.layer_stride),
            int(settings.layer_heads),
            device,
            float(limits.get(device.type, 0.0)),
            warmup=int(settings.warmup),
            repeats=int(settings.repeats),
        )
        print(
            f"\ncost vs resolution: single layers, {settings.layer_width} channels on a map of side "
            f"resolution/{settings.layer_stride}, batch 1, fp32"
        )
        print(
            markdown_table(
                ("layer", "resolution", "map", "tokens", "GFLOPs", "ms", "peak MiB", "note"),
                [
                    measured(
                        [
                            p.layer,
                            p.resolution,
                            f"{p.map_side}x{p.map_side}",
                            p.tokens,
                            p.gflops,
                            p.ms,
                            p.peak_mib,
                            p.note,
                        ]
                    )
                    for p in points
                ],
                align="lrrrrrrl",
            )
        )
        print(
            "growth of GFLOPs with the pixel count (1 = linear, 2 = quadratic): "
            + ", ".join(f"{layer} {growth_exponent(points, layer):.2f}" for layer in CURVE_LAYERS)
        )
        files += [out_dir / "resolution_curve.csv", out_dir / "resolution_curve.png"]
        curve_keys = [f.name for f in fields(CurvePoint)]
        write_csv(files[1], curve_keys, ([getattr(p, k) for k in curve_keys] for p in points))
        plot_curve(
            points,
            files[2],
            f"cost vs resolution: {settings.layer_width} channels at stride {settings.layer_stride} on {device.type}",
        )
    print("\nwritten: " + ", ".join(str(f) for f in files))
    return Outcome()


def main(args: Sequence[str]) -> int:
    """``das-lab profile [hydra overrides]``."""
    return run_command(profile, "profile", "profile", args)
