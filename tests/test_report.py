"""``das-lab report``: the table, CSV and plots of a sweep, on partial and failed sweeps too."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from cli_helpers import TINY, run_cli
from das_lab.report import build_report, find_jobs, main, parse_overrides, swept_keys
from das_lab.run import RunRecord

# one training and one validation step per job, no test
FAST = [*TINY, "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "test=false"]


def _job(sweep: Path, num: int, overrides: list[str], metrics: dict | None, monitor: str = "val/acc1") -> Path:
    """A job folder as Hydra and RunRecord leave it; ``metrics=None`` leaves no metrics.json."""
    folder = sweep / f"{num}_{','.join(overrides)}"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"monitor": monitor, "seed": 0}))
    if metrics is not None:
        payload = {
            "status": "completed",
            "final": {},
            "best": {},
            "params": 1_500_000,
            "gflops": 0.25,
            "overrides": overrides,
            "wall_time_s": 75.0,
            "ckpt_best": None,
            **metrics,
        }
        (folder / "metrics.json").write_text(json.dumps(payload))
    return folder


def _completed(acc: float, final: float | None = None) -> dict:
    return {"best": {"val/acc1": acc, "val/loss": 1.0}, "final": {"val/acc1": final if final is not None else acc}}


def test_parse_overrides_drops_prefixes():
    parsed = parse_overrides(["+experiment=x", "model=das", "++seed=3", "~tags"])
    assert parsed == {"experiment": "x", "model": "das", "seed": "3"}


def test_swept_keys_are_those_that_differ(tmp_path):
    common = ["trainer.max_epochs=1"]
    _job(tmp_path, 0, [*common, "model=a", "seed=1"], _completed(0.5))
    _job(tmp_path, 1, [*common, "model=b", "seed=1"], _completed(0.6))
    _job(tmp_path, 2, [*common, "model=b", "seed=1", "optimizer.lr=0.1"], _completed(0.7))
    assert swept_keys(find_jobs([tmp_path])) == ["model", "optimizer.lr"]


def test_report_of_partial_sweep_with_seeds(tmp_path):
    sweep = tmp_path / "multirun" / "2026-01-01" / "10-00-00.000001"
    _job(sweep, 0, ["model=a", "seed=1"], _completed(0.50, 0.40))
    _job(sweep, 1, ["model=a", "seed=2"], _completed(0.70))
    _job(sweep, 2, ["model=b", "seed=1"], _completed(0.80))
    failed_dir = sweep / "3_model=b,seed=2"
    (failed_dir / ".hydra").mkdir(parents=True)
    (failed_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=b", "seed=2"]))
    record = RunRecord(failed_dir, ["model=b", "seed=2"])
    record.failed(ValueError("diverged"), {"val/acc1": 0.1})
    _job(sweep, 4, ["model=c", "seed=1"], None)  # files fresh: still running
    stale = _job(sweep, 5, ["model=c", "seed=2"], None)
    old = time.time() - 2 * 3600
    for path in [stale, *stale.rglob("*")]:
        os.utime(path, (old, old))

    text = build_report([sweep], sweep)

    lines = text.splitlines()
    assert [cell.strip() for cell in lines[0].split("|")[1:-1]] == [
        "job",
        "model",
        "seed",
        "params (M)",
        "GFLOPs",
        "best val/acc1 (%)",
        "final val/acc1 (%)",
        "time",
        "status",
    ]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[2:]]
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "4", "5"]
    assert rows[0] == ["0", "a", "1", "1.500", "0.250", "50.00", "40.00", "1:15", "completed"]
    assert [r[-1] for r in rows] == ["completed", "completed", "completed", "failed", "running", "missing"]
    assert rows[3][5] == "10.00"  # a failed job keeps the best value it reached
    assert rows[4][1:3] == ["c", "1"] and rows[4][3] == "-"

    with (sweep / "report.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 6
    assert float(table[1]["best val/acc1"]) == pytest.approx(0.7)
    assert table[3]["status"] == "failed"

    markdown = (sweep / "report.md").read_text()
    assert "3 completed, 1 failed, 1 running, 1 missing" in markdown
    # model a: seeds 1 and 2 -> mean 60 %, sample std 14.14 %; model b: only the completed seed
    assert "| a     | 60.00 ± 14.14     | 2     |" in markdown
    assert "| b     | 80.00 ± 0.00      | 1     |" in markdown
    assert "![report_model](report_model.png)" in markdown
    assert (sweep / "report_model.png").read_bytes()[:4] == b"\x89PNG"


def test_report_reads_several_sweeps_and_writes_to_out(tmp_path, capsys):
    for name, acc in (("s1", 0.5), ("s2", 0.6)):
        _job(tmp_path / "multirun" / name, 0, ["model=a", f"optimizer.lr={acc}"], _completed(acc))
    out = tmp_path / "out"
    assert main([str(tmp_path / "multirun" / "s*"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| s1/0 | 0.5" in printed and "| s2/0 | 0.6" in printed
    assert {p.name for p in out.iterdir()} == {"report.md", "report.csv", "report_optimizer.lr.png"}


def test_report_of_missing_folder_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"das-lab report: error: no sweep folder at {tmp_path / 'nowhere'}: "
        "give a multirun folder, e.g. multirun/DATE/TIME"
    )


@pytest.mark.slow
def test_two_by_two_sweep_report(tmp_path):
    result = run_cli(
        ["train", "-m", "hydra/launcher=basic", "model=resnet_tiny,das_resnet_tiny", "seed=1,2", *FAST], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    report = run_cli(["report", str(sweep)], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    rows = [line for line in report.stdout.splitlines() if line.startswith("| ") and "completed" in line]
    assert len(rows) == 4
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows]
    assert [(c[1], c[2]) for c in cells] == [
        ("resnet_tiny", "1"),
        ("resnet_tiny", "2"),
        ("das_resnet_tiny", "1"),
        ("das_resnet_tiny", "2"),
    ]
    assert all(0 <= float(c[5]) <= 100 for c in cells)
    assert float(cells[2][3]) > float(cells[0][3])  # the DAS gates add parameters
    assert (sweep / "report_model.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Mean ± std over seeds" in (sweep / "report.md").read_text()
