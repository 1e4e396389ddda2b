"""Broken image files in a real-format dataset, as `das-lab train` users meet them."""

from __future__ import annotations

import pytest

from cli_helpers import read_metrics, run_cli, run_dirs
from fake_datasets import DOG_BREEDS, make_stanford_dogs
from test_training_recipes_cli import SHORT

pytestmark = pytest.mark.slow


def _dogs(tmp_path, *extra: str) -> list[str]:
    return [
        "train",
        "data=stanford_dogs",
        f"data.root={tmp_path / 'dogs'}",
        f"data.num_classes={len(DOG_BREEDS)}",
        f"data.cache_dir={tmp_path / 'cache'}",
        *SHORT,
        "test=false",
        *extra,
    ]


def test_zero_byte_image_is_skipped_with_skip_corrupt(tmp_path):
    fake = make_stanford_dogs(tmp_path / "dogs")
    empty = fake.root / "Images" / fake.train[0]
    empty.write_bytes(b"")
    result = run_cli(_dogs(tmp_path, "data.batch_size=12", "data.skip_corrupt=true"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(run_dirs(tmp_path)[0])["status"] == "completed"
    log = result.stdout + result.stderr
    assert "train epoch 0: 1 corrupt image(s) skipped" in log and str(empty) in log


def test_undecodable_image_stops_training_with_one_line_naming_it(tmp_path):
    fake = make_stanford_dogs(tmp_path / "dogs")
    text = fake.root / "Images" / fake.train[0]
    text.write_text("not an image\n")
    result = run_cli(_dogs(tmp_path, "data.batch_size=12", "data.num_workers=1"), cwd=tmp_path)
    assert result.returncode == 2
    assert (
        f"das-lab: error: {text}: cannot decode image (not a format torchvision or Pillow can read);" in result.stderr
    )
    assert "Traceback" not in result.stderr and "BytesIO" not in result.stderr
    (run_dir,) = run_dirs(tmp_path)
    assert read_metrics(run_dir)["status"] == "failed" and str(text) in (run_dir / "FAILED").read_text()
