"""``das-lab report --wandb``: the sweep table, seed summary and plots in an offline W&B run of the sweep's group."""

from __future__ import annotations

import json

from das_lab.report import main
from test_report import _completed, _job
from test_wandb import finished_records, wandb_env  # noqa: F401  (fixture)


def test_report_logs_its_tables_and_plots_to_an_offline_wandb_run(wandb_env, capsys):  # noqa: F811
    sweep = wandb_env / "multirun" / "2026-01-01" / "10-00-00.000001"
    _job(sweep, 0, ["model=a", "seed=1"], _completed(0.50))
    _job(sweep, 1, ["model=a", "seed=2"], _completed(0.70))
    _job(sweep, 2, ["model=b", "seed=1"], _completed(0.80))
    assert main([str(sweep), "--wandb"]) == 0
    assert "W&B run: " in capsys.readouterr().out

    (run_dir,) = (sweep / "wandb").glob("offline-run-*")
    (table_file,) = run_dir.glob("files/media/table/sweep_table_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][:5] == ["job", "model", "seed", "params", "gflops"]
    assert [row[1:3] for row in table["data"]] == [["a", 1.0], ["a", 2.0], ["b", 1.0]]
    assert [row[table["columns"].index("best val/acc1")] for row in table["data"]] == [0.5, 0.7, 0.8]
    (seed_file,) = run_dir.glob("files/media/table/seed_table_*.table.json")
    seeds = json.loads(seed_file.read_text())
    assert seeds["data"][0][0] == "a" and abs(seeds["data"][0][1] - 0.6) < 1e-9 and seeds["data"][0][3] == 2
    assert list(run_dir.glob("files/media/images/report_*.png"))
    (log_file,) = run_dir.glob("run-*.wandb")
    (run,) = [r.run for r in finished_records(log_file) if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "multirun-2026-01-01-10-00-00.000001" and run.job_type == "report"
