"""CSV history of resumed runs: the earlier attempt's rows stay, the steps the new attempt repeats are replaced."""

from __future__ import annotations

import csv

import pytest

from cli_helpers import TINY, read_metrics, run_cli, run_dirs
from das_lab.loggers import CSVLogger


def _rows(path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


def test_resumed_csv_logger_keeps_earlier_rows_and_replaces_repeated_steps(tmp_path):
    first = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    resumed = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    resumed.log_metrics({"train/loss": 30.0, "val/acc1": 0.5}, step=3)
    resumed.save()
    rows = _rows(tmp_path / "csv" / "metrics.csv")
    assert [(row["step"], row["train/loss"]) for row in rows] == [
        ("0", "0.0"),
        ("1", "1.0"),
        ("2", "2.0"),
        ("3", "30.0"),
    ]
    assert rows[-1]["val/acc1"] == "0.5" and rows[0]["val/acc1"] == ""


@pytest.mark.slow
def test_resume_with_ckpt_path_last_continues_the_csv_history(tmp_path):
    assert run_cli(["train", *TINY, "test=false"], cwd=tmp_path).returncode == 0
    (run,) = run_dirs(tmp_path)
    resumed = run_cli(
        ["train", *TINY, "test=false", "trainer.max_epochs=2", f"hydra.run.dir={run}", "ckpt_path=last"], cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_metrics(run)["status"] == "completed"
    epochs = [row["epoch"] for row in _rows(run / "csv" / "metrics.csv") if row.get("val/acc1")]
    assert epochs == ["0", "1"]
