"""The task contract: declared metrics drive best epochs, sweep directions, metrics.json and reports; typed data."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from das_lab.data.digits import DigitsDataModule
from das_lab.errors import CheckpointError, ConfigError
from das_lab.models.weights import read_torch_file
from das_lab.report import build_report
from das_lab.run import MetricHistory, RunRecord
from das_lab.search import SearchConfigError
from das_lab.search.study import objective_direction
from das_lab.tasks.base import (
    DetectionData,
    ImageInputs,
    MetricSpec,
    declarations_from_record,
    metric_declarations,
    monitored_declarations,
    require_data,
    task_metrics,
)
from das_lab.tasks.classification import ClassificationModule
from das_lab.tasks.detection import DetectionModule
from das_lab.tasks.segmentation import SegmentationModule
from das_lab.utils.tables import markdown_table, write_csv

# values exact in float32, as Lightning logs them
EPOCHS = [
    {"val/acc1": 0.5, "val/loss": 1.0},
    {"val/acc1": 0.75, "val/loss": 0.25},
    {"val/acc1": 0.625, "val/loss": 2.0},
]


def _history(monitor: str, monitor_mode: str, epochs=EPOCHS) -> MetricHistory:
    specs = task_metrics(ClassificationModule)
    history = MetricHistory(
        monitored_declarations(specs, monitor, monitor_mode, "ClassificationModule"), "ClassificationModule"
    )
    for values in epochs:
        trainer = SimpleNamespace(
            sanity_checking=False, callback_metrics={k: torch.tensor(v) for k, v in values.items()}
        )
        history.on_validation_end(trainer, None)
    return history


def test_every_task_declares_each_logged_metric_once():
    for task in (ClassificationModule, DetectionModule, SegmentationModule):
        keys = [key for spec in task_metrics(task) for key in spec.keys()]
        assert len(keys) == len(set(keys)) and "train/loss" in keys
        assert sum(spec.headline for spec in task_metrics(task)) == 1
    assert {"val/map", "test/mask_map_large"} <= set(metric_declarations(task_metrics(DetectionModule)))
    with pytest.raises(TypeError, match="declares no metrics: give it a class attribute metric_specs"):
        task_metrics(torch.nn.Linear)


def test_best_epoch_follows_the_declared_direction_and_monitor_mode():
    best = _history("val/acc1", "max").best()
    assert best == {"val/acc1": 0.75, "val/loss": 0.25}  # declared: accuracy up, loss down
    assert _history("val/acc1", "min").best() == {"val/acc1": 0.5, "val/loss": 0.25}  # monitor_mode wins for monitor
    assert _history("val/loss", "max").best() == {"val/acc1": 0.75, "val/loss": 2.0}
    nan = _history("val/acc1", "max", [{"val/acc1": float("nan")}, {"val/acc1": 0.25}, {"val/acc1": float("nan")}])
    assert nan.best() == {"val/acc1": 0.25}  # undefined never wins


def test_monitor_and_undeclared_metrics_are_refused_in_one_line(caplog):
    specs = task_metrics(ClassificationModule)
    with pytest.raises(
        ConfigError,
        match=r"monitor=val/map: ClassificationModule logs no such metric; set monitor to "
        r"one of train/loss, val/loss, val/acc1, val/acc5$",
    ):
        monitored_declarations(specs, "val/map", "max", "ClassificationModule")
    with pytest.raises(ConfigError, match="monitor_mode=up: expected one of max, min"):
        monitored_declarations(specs, "val/acc1", "up", "ClassificationModule")
    monitored_declarations(specs, "val/acc1", "min", "ClassificationModule")
    assert "declared 'max' by ClassificationModule, but monitor_mode=min" in caplog.text
    with pytest.raises(
        ValueError,
        match=r"val/f1 logged but not declared by ClassificationModule: add a MetricSpec "
        r"for it to ClassificationModule.metric_specs",
    ):
        _history("val/acc1", "max", [{"val/acc1": 0.5, "val/f1": 0.2}])


def test_sweep_objective_goes_the_way_of_monitor_mode():
    # what a job returns to the sweeper: its best monitored value, judged by monitor_mode
    assert _history("val/acc1", "min").best()["val/acc1"] == 0.5
    assert objective_direction("min", "val/acc1", "min") == "minimize"
    assert objective_direction("maximize", "val/loss", "max") == "maximize"
    with pytest.raises(
        SearchConfigError,
        match="hydra.sweeper.direction=max but monitor_mode=min: each job returns "
        "its best val/loss judged by monitor_mode, so the study must minimize",
    ):
        objective_direction("max", "val/loss", "min")


def test_metrics_json_records_how_each_metric_was_judged(tmp_path):
    record = RunRecord(tmp_path, [])
    record.declared = monitored_declarations(task_metrics(ClassificationModule), "val/acc1", "min", "Classification")
    record.completed({"val/acc1": 0.625, "train/lr": 0.1}, _history("val/acc1", "min").best(), None)
    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["metrics"] == {
        "val/acc1": {"direction": "min", "unit": "fraction", "title": "top-1 accuracy", "headline": True},
        "val/loss": {"direction": "min", "unit": "value", "title": "loss", "headline": False},
    }
    assert declarations_from_record(payload["metrics"])["val/acc1"] == MetricSpec(
        "acc1", "min", "fraction", "top-1 accuracy", ("val",), True
    )


def _run(sweep: Path, num: int, metrics: dict, config: dict) -> None:
    folder = sweep / f"{num}_model=m{num}"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps({"status": "completed", "overrides": [f"model=m{num}"], **metrics}))


def test_report_formats_fractions_in_percent_and_values_as_they_are(tmp_path):
    psnr = {"direction": "max", "unit": "value", "title": "PSNR", "headline": True}
    acc = {"direction": "max", "unit": "fraction", "title": "top-1", "headline": True}
    _run(
        tmp_path,
        0,
        {"best": {"val/psnr": 31.25}, "final": {"val/psnr": 30.5}, "metrics": {"val/psnr": psnr}},
        {"monitor": "val/psnr"},
    )
    _run(
        tmp_path,
        1,
        {"best": {"val/acc1": 0.8125, "val/loss": 0.5}, "final": {"val/acc1": 0.75}, "metrics": {"val/acc1": acc}},
        {"monitor": "val/acc1"},
    )
    # a run from before metrics.json held declarations: its task's declarations apply
    _run(
        tmp_path,
        2,
        {"best": {"val/map": 0.375}, "final": {"val/map": 0.25}},
        {"monitor": "val/map", "task": {"_target_": "das_lab.tasks.detection.DetectionModule"}},
    )
    header, *_, row0, row1, row2 = [
        [c.strip() for c in line.split("|")[1:-1]] for line in build_report([tmp_path], tmp_path).splitlines()
    ]
    assert header[4:-2] == [
        "best val/psnr",
        "final val/psnr",
        "best val/acc1 (%)",
        "final val/acc1 (%)",
        "best val/map (%)",
        "final val/map (%)",
    ]
    assert row0[4:-2] == ["31.25", "30.5", "-", "-", "-", "-"]
    assert row1[4:-2] == ["-", "-", "81.25", "75.00", "-", "-"]
    assert row2[4:-2] == ["-", "-", "-", "-", "37.50", "25.00"]


def test_search_report_shows_the_objective_in_its_unit(tmp_path):
    import optuna

    from das_lab.search.report import search_section
    from das_lab.search.study import open_storage, open_study, save_location

    study = open_study(open_storage(str(tmp_path / "optuna.journal")), "train", "max", None, "here")
    save_location(tmp_path, "train", str(tmp_path / "optuna.journal"), "val/acc1", "max")
    study.add_trial(optuna.create_trial(value=0.25))
    declared = metric_declarations(task_metrics(ClassificationModule))
    text = "\n".join(search_section(tmp_path, tmp_path, declared))
    assert "Best trial: 0, val/acc1 (%) = 25.00" in text and "| value (%) |" in text


def test_datamodules_are_checked_against_what_the_task_reads():
    digits = DigitsDataModule(image_size=32, digit_size=16)
    with pytest.raises(
        ConfigError,
        match=r"^DigitsDataModule lacks category_ids, with_masks, ground_truth, which "
        r"task=detection reads \(DetectionData in das_lab/tasks/base.py\)",
    ):
        require_data(digits, DetectionData, "task=detection")
    with pytest.raises(ConfigError, match="task=detection reads its data through a datamodule"):
        require_data(None, DetectionData, "task=detection")
    inputs = require_data(digits, ImageInputs, "das-lab visualize")
    image = inputs.eval_transform(torch.full((3, 20, 40), 255, dtype=torch.uint8))
    assert image.shape == (3, 32, 32) and torch.allclose(image, torch.full_like(image, (1.0 - 0.1) / 0.25))


def test_data_modules_never_import_tasks():
    data = Path(__file__).parents[1] / "das_lab" / "data"
    for path in data.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(name.startswith("das_lab.tasks") for name in names), f"{path.name} imports {names}"


def test_one_table_renderer_and_csv_writer(tmp_path):
    text = markdown_table(["name", "n"], [["a", 10], ["bbb", None]], align="lr")
    assert text.splitlines() == ["| name |  n |", "|------|---:|", "| a    | 10 |", "| bbb  |  - |"]
    with pytest.raises(ValueError, match="align='l': expected one letter, l or r, for each of the 2 columns"):
        markdown_table(["name", "n"], [], align="l")
    assert write_csv(tmp_path / "t.csv", ["a", "b"], iter([[1, None], ["x", 2.5]])) == 2
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b", "1,", "x,2.5"]


def test_one_checkpoint_reader_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .* \(it is a folder, not a file; check x\)"):
        read_torch_file(tmp_path, "weights file", "check x")
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"cut.ckpt is not a readable checkpoint \(truncated .*\); check y$"):
        read_torch_file(tmp_path / "cut.ckpt", "checkpoint", "check y")
