"""`das-lab report` shows segmentation sweeps with their mIoU columns, in percent."""

from __future__ import annotations

from das_lab.report import build_report
from test_report import _job


def test_report_has_miou_columns_in_percent(tmp_path):
    sweep = tmp_path / "multirun" / "2026-01-01" / "10-00-00.000001"
    for num, (model, miou) in enumerate((("resnet50", 0.4212), ("das_resnet50", 0.4387))):
        metrics = {"best": {"val/miou": miou, "val/macc": 0.5}, "final": {"val/miou": miou - 0.01, "test/miou": miou}}
        _job(sweep, num, [f"model={model}"], metrics, monitor="val/miou")
    text = build_report([sweep], tmp_path / "report")
    header = text.splitlines()[0]
    assert "best val/miou (%)" in header and "final test/miou (%)" in header
    assert "43.87" in text and "42.12" in text
