"""W&B logging: offline by itself, one run per job (grouped by sweep), records readable, no secrets."""

from __future__ import annotations

import json
import secrets
import struct
import time
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger
from wandb.proto import wandb_internal_pb2

from cli_helpers import TINY, run_cli
from das_lab.loggers import WandbLogger, close_loggers, offline_reason, sweep_group

# one training and one validation step per job, no test
FAST = [*TINY, "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "test=false"]

# random, so that no file holds it by chance (a run's git.diff may contain this test's source)
SECRET = f"fake-secret-{secrets.token_hex(4)}"
_BLOCK = 32768


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Records of a ``.wandb`` transaction log (W&B's LevelDB-style log of protobuf records)."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        pos += 7
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(path: Path, timeout_s: float = 30.0) -> list[wandb_internal_pb2.Record]:
    """Records of a finished run; W&B's writer process may still be flushing the file when the run returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _of(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def _history_keys(records) -> set[str]:
    return {item.key or "/".join(item.nested_key) for h in _of(records, "history") for item in h.item}


@pytest.fixture()
def wandb_env(tmp_path, monkeypatch):
    """W&B's own folders in tmp; no key, no netrc."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def test_offline_without_key_or_server(wandb_env, monkeypatch):
    assert offline_reason(None) == "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    (wandb_env / "no_netrc").write_text("machine 127.0.0.1 login user password a-key\n")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert offline_reason(None) == "http://127.0.0.1:9 is not reachable"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert offline_reason(None) == "WANDB_MODE=offline"
    monkeypatch.delenv("WANDB_MODE")
    assert offline_reason(True) == "logger.wandb.offline=true"
    assert offline_reason(False) is None  # explicitly online: W&B decides


def test_sweep_group_names():
    assert sweep_group("/logs/multirun/2026-11-29/22-50-00.123456") == "multirun-2026-11-29-22-50-00.123456"
    assert sweep_group("/somewhere/my_sweep") == "my_sweep"


def test_close_loggers_finishes_failed_run_and_keeps_summary(wandb_env):
    import wandb

    logger = WandbLogger(project="das-lab", save_dir=str(wandb_env / "run"), name="job", log_model=True)
    logger.log_hyperparams({"params": 1234, "gflops": 0.5, "optimizer": {"lr": 0.1}})
    logger.log_metrics({"val/acc1": 0.25}, step=3)
    close_loggers(
        [CSVLogger(str(wandb_env / "csv")), logger], failed=True, best={"val/acc1": 0.5, "val/map_large": None}
    )
    assert wandb.run is None
    close_loggers([logger], failed=False)  # closing twice is harmless

    (log_file,) = (wandb_env / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = finished_records(log_file)
    (run,) = _of(records, "run")
    assert run.display_name == "job" and run.project == "das-lab"
    config = {u.key: json.loads(u.value_json) for r in _of(records, "config") for u in r.update}
    config.update({u.key: json.loads(u.value_json) for u in run.config.update})
    assert config["optimizer"] == {"lr": 0.1}
    summary = {
        u.key or "/".join(u.nested_key): json.loads(u.value_json) for s in _of(records, "summary") for u in s.update
    }
    assert summary["params"] == 1234 and summary["gflops"] == 0.5
    assert summary["best/val/acc1"] == 0.5 and "best/val/map_large" not in summary  # metrics.json's best; null left out
    assert "val/acc1" in _history_keys(records)
    assert [e.exit_code for e in _of(records, "exit")] == [1]


def test_a_run_left_open_is_finished_not_reused(wandb_env):
    import wandb

    first = WandbLogger(project="das-lab", save_dir=str(wandb_env / "a"), name="first")
    first_id = first.experiment.id
    second = WandbLogger(project="das-lab", save_dir=str(wandb_env / "b"), name="second")
    assert second.experiment.id != first_id
    close_loggers([second], failed=False)
    assert wandb.run is None


@pytest.mark.slow
def test_multirun_offline_runs_are_grouped_and_hold_metrics_and_images(wandb_env):
    args = [
        "train",
        "-m",
        "hydra/launcher=basic",
        "seed=1,2",
        "logger=[csv,wandb]",
        "callbacks=visualize",
        "callbacks.visualize.num_images=2",
        "model=das_resnet_tiny",
        *FAST,
    ]
    env = {"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"}
    result = run_cli(args, cwd=wandb_env, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("W&B logs offline: WANDB_MODE=offline") == 2  # once per job
    assert "upload it later with: wandb sync " in output

    (sweep,) = (wandb_env / "multirun").glob("*/*")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert len(jobs) == 2
    names = []
    for job in jobs:
        (log_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
        records = finished_records(log_file)
        (run,) = _of(records, "run")
        assert run.run_group == f"multirun-{sweep.parent.name}-{sweep.name}"
        assert [e.exit_code for e in _of(records, "exit")] == [0]  # every job finished its own run
        names.append(run.display_name)
        keys = _history_keys(records)
        summary = {
            u.key or "/".join(u.nested_key): json.loads(u.value_json) for s in _of(records, "summary") for u in s.update
        }
        metrics = json.loads((job / "metrics.json").read_text())
        assert {"params", "gflops"} <= set(summary) and metrics["params"] > 0
        assert {f"best/{name}": value for name, value in metrics["best"].items()} == {
            key: value for key, value in summary.items() if key.startswith("best/")
        }
        assert {"val/acc1", "val/loss", "visualizations/0_gates/_type", "visualizations/1_gates/_type"} <= keys
        assert len(list(log_file.parent.glob("files/media/images/visualizations/*_gates_*.png"))) == 2
        figures = sorted(p.name for p in (job / "visualizations" / "epoch_000").iterdir())
        assert figures == ["0_gates.png", "1_gates.png"]
    assert len(set(names)) == 2 and all(name.startswith("callbacks=visualize") or "seed=" in name for name in names)
    assert [n for n in names if "seed=1" in n] and [n for n in names if "seed=2" in n]

    for path in sweep.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in output


def test_resumed_training_continues_the_same_wandb_run(wandb_env):
    run_dir = wandb_env / "run"
    common = ["train", "logger=wandb", *FAST, f"hydra.run.dir={run_dir}"]
    env = {"WANDB_MODE": "offline"}
    first = run_cli([*common, "trainer.max_epochs=1"], cwd=wandb_env, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli([*common, "trainer.max_epochs=2", "ckpt_path=last"], cwd=wandb_env, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    run_ids = [_of(finished_records(path), "run")[0].run_id for path in runs]
    assert run_ids[0] == run_ids[1]
