"""Test-wide settings: tests run on tiny tensors, where one thread is fastest and deterministic."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def single_thread_torch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, str]:
    """A tiny DAS-ResNet trained on digits through the CLI, shared by export and predict tests: (folder, best ckpt)."""
    from cli_helpers import TINY, read_metrics, run_cli, run_dirs

    root = tmp_path_factory.mktemp("tiny_checkpoint")
    result = run_cli(["train", *TINY], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, read_metrics(run_dirs(root)[0])["ckpt_best"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """SLURM tests first: they mostly wait on the scheduler, so under ``pytest -n 2`` the other worker
    runs the rest of the suite meanwhile instead of leaving them for the end."""
    items.sort(key=lambda item: item.get_closest_marker("slurm") is None)


@pytest.fixture(autouse=True)
def no_process_group_left_behind():
    """A DDP rank 0 run inside the test process would leave its process group to every later test
    (Lightning's next Trainer waits at a barrier for ranks that are gone): DDP runs need their own process."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        pytest.fail(
            "the test left a torch.distributed process group in the test process; run DDP in its own "
            "process (cli_helpers.run_console)"
        )


@pytest.fixture(autouse=True)
def no_logging_into_closed_streams():
    """Commands run in the test process set up logging (Hydra's job logging) on the streams of the moment,
    such as pytest's captured stderr, which is closed after the test: a later test's log record would
    print "--- Logging error ---" into its own output. Such handlers go when their stream closes."""
    yield
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)
