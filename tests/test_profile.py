"""``das-lab profile``: model table, comparison ratios and the cost-vs-resolution curve."""

from __future__ import annotations

import csv

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cli_helpers import run_cli, run_dirs
from das_lab.errors import UserError
from das_lab.models.builder import compose_model_config
from das_lab.profile import growth_exponent, model_config, resolution_curve

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny tensors: one thread is fastest on a shared machine
FAST = ["profile.image_size=64", "profile.batch_size=2", "profile.warmup=1", "profile.repeats=2"]


def _rows(path):
    with path.open() as file:
        return list(csv.DictReader(file))


def test_profile_prints_the_table_and_writes_csv(tmp_path):
    result = run_cli(["profile", "model=das_resnet_tiny", *FAST], tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert "| das_resnet_tiny |" in result.stdout and "fwd+bwd img/s" in result.stdout
    assert "USDT" not in result.stderr  # kineto's profiler_start/stop notices stay off the screen
    (run_dir,) = run_dirs(tmp_path)
    assert str(run_dir / "profile.csv") in result.stdout
    (row,) = _rows(run_dir / "profile.csv")
    cfg = compose_model_config("das_resnet_tiny")
    cfg.num_classes = 10  # digits, the profile's default data
    net = instantiate(cfg)
    assert float(row["params_m"]) == pytest.approx(sum(p.numel() for p in net.parameters()) / 1e6)
    assert float(row["gflops"]) > 0.01
    for key in ("fwd_img_s", "train_img_s", "train_peak_mib"):
        assert float(row[key]) > 0, key


def test_compare_and_resolution_curve(tmp_path):
    result = run_cli(
        [
            "profile",
            "profile.compare=[resnet_tiny,das_resnet_tiny]",
            "profile.resolutions=[32,64]",
            "profile.timing_limit_gmacs.cpu=0.001",
            *FAST,
        ],
        tmp_path,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path)
    first, gated = _rows(run_dir / "profile.csv")
    assert (first["model"], gated["model"]) == ("resnet_tiny", "das_resnet_tiny")
    for key in ("params_x", "gflops_x", "fwd_img_s_x", "train_img_s_x"):
        assert float(first[key]) == 1.0
    assert float(gated["params_x"]) > 1.0 and float(gated["gflops_x"]) > 1.0
    assert "params x" in result.stdout
    points = _rows(run_dir / "resolution_curve.csv")
    assert {(p["layer"], int(p["resolution"])) for p in points} == {
        (layer, r) for layer in ("das_gate", "dat_deformable_attention", "global_attention") for r in (32, 64)
    }
    untimed = [p for p in points if not p["ms"]]
    assert untimed and all("not timed" in p["note"] for p in untimed)
    assert any(p["ms"] for p in points)  # the cheapest points are timed
    png = (run_dir / "resolution_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_curve_flops_grow_linearly_for_das_and_quadratically_for_global_attention():
    width, heads = 64, 2
    points = resolution_curve([32, 64], width, 1, heads, torch.device("cpu"), timing_limit_gmacs=0.0)
    gmacs = {(p.layer, p.resolution): p.gflops for p in points}
    assert all(p.ms is None for p in points)
    assert gmacs["das_gate", 64] / gmacs["das_gate", 32] == pytest.approx(4.0)
    for side in (32, 64):
        n = side * side
        projections = 4 * n * width * width  # q, k, v and output 1x1 projections
        attention = 2 * n * n * width  # q.k^T and attn.v over all heads
        assert gmacs["global_attention", side] == pytest.approx((projections + attention) / 1e9)
    assert growth_exponent(points, "das_gate") == pytest.approx(1.0)
    assert growth_exponent(points, "global_attention") > 1.9
    assert 1.0 < growth_exponent(points, "dat_deformable_attention") < growth_exponent(points, "global_attention")


def test_curve_rejects_resolutions_off_the_stride():
    with pytest.raises(UserError, match="not a multiple of profile.layer_stride=4"):
        resolution_curve([30], 64, 4, 2, torch.device("cpu"), 0.0)


def test_unknown_compare_entry_names_the_choices():
    cfg = OmegaConf.create({"data": {"num_classes": 3}, "model": None})
    with pytest.raises(UserError, match="no config .*choose from: .*das_resnet50"):
        model_config(cfg, "resnet5O")
    assert model_config(cfg, "resnet_tiny").num_classes == 3
    assert list(model_config(cfg, "das_resnet_tiny").gate_stages) == [2, 3]


def test_help_lists_only_the_groups_profile_uses(tmp_path):
    result = run_cli(["profile", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    groups = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert [line.split(":")[0] for line in groups.splitlines() if ": " in line] == [
        "data",
        "model",
        "task",
        "optimizer",
        "scheduler",
        "paths",
    ]
    assert "das_resnet_tiny" in groups
    assert not (tmp_path / "outputs").exists()
