"""`das-lab eval` data replacements (data.root, data.batch_size, data.num_workers) on a checkpoint's dataset."""

from __future__ import annotations

import pytest

from cli_helpers import TINY, read_metrics, run_cli, run_dirs

pytestmark = pytest.mark.slow


def test_eval_of_a_digits_checkpoint_refuses_data_root_in_one_line(tmp_path):
    """The embedded digits have no folder: data.root cannot apply, and saying so beats ignoring it."""
    trained = run_cli(["train", *TINY, "test=false"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = read_metrics(run_dirs(tmp_path)[0])["ckpt_best"]
    result = run_cli(["eval", f"ckpt_path={ckpt}", f"data.root={tmp_path}", "data.batch_size=8"], cwd=tmp_path)
    assert result.returncode == 2
    assert (
        f"das-lab: error: data.root={tmp_path}: the checkpoint's dataset (das_lab.data.digits.DigitsDataModule) "
        "has no 'root' setting; drop data.root (replaceable here: batch_size, num_workers)"
    ) in result.stderr
    assert "Traceback" not in result.stderr and "unexpected keyword" not in result.stderr
