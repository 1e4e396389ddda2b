"""The one run wrapper of every das-lab command: run record, FAILED, metrics.json status, logger
closing and exit code.

A command is a function ``task(cfg, run) -> Outcome``; :func:`run_command` runs it as a Hydra app.
Exit status: 0 done, 1 a bug (traceback on screen and in FAILED), 2 an input error (one line),
128 + signal number when interrupted (SIGINT 130, SIGTERM 143).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from das_lab.errors import RunFolderError, UserError

log = logging.getLogger("das_lab")

# errors of the file system that are about where the user asked das-lab to write, not bugs
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


@dataclass
class Outcome:
    """What a command measured: metrics.json's ``final``/``best``/``ckpt_best``; ``objective`` goes to sweepers."""

    final: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    ckpt_best: Optional[str] = None
    objective: Optional[float] = None


class Run:
    """A command's side of the wrapper: what to close and record if the command stops early."""

    def __init__(self, run_dir: Path, overrides: list[str]) -> None:
        from das_lab.run import RunRecord

        self.record = RunRecord(run_dir, overrides)
        self.loggers: list[Any] = []
        self.measured: Callable[[], dict[str, float]] = dict
        self.resume_checkpoint: Optional[Path] = None
        self.started = False

    @property
    def dir(self) -> Path:
        return self.record.run_dir

    def start(self) -> None:
        """The command's work begins: from here on a failure keeps the folder and records why.

        Before it, an input error leaves nothing behind: a folder this command created is removed,
        a used folder (a failed resume) keeps its earlier records untouched.
        """
        self.started = True


class Stop(BaseException):
    """Carries a command's error past Hydra, which would catch an Exception and print it its own way."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped a command; its record says ``interrupted`` and how to go on."""

    def __init__(self, signum: signal.Signals, hint: str) -> None:
        super().__init__(signum, hint)
        self.signum = signal.Signals(signum)
        self.hint = hint

    def __str__(self) -> str:
        return f"interrupted by {self.signum.name}; {self.hint}"


class JobDied(Exception):
    """A sweep job's process ended without reporting back: killed by a signal (segfault, kill -9, OOM)."""


def interrupting_signal(error: BaseException) -> Optional[signal.Signals]:
    """The signal behind ``error`` when it is an interruption (Lightning turns both into exits), else None."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(error, SIGTERMException):
        return signal.SIGTERM
    if isinstance(error, KeyboardInterrupt) or (
        isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt)
    ):
        return signal.SIGINT
    return None


def _origin_is_das_lab(error: BaseException) -> bool:
    """True when ``error`` was raised by das-lab's own code (its input checks), not inside a library."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("das_lab.")


def one_line(error: BaseException) -> Optional[str]:
    """The one-line message of an input error, or None for a bug (which keeps its traceback).

    Input errors: :class:`UserError` and its kinds, Hydra's and OmegaConf's config errors, files
    that do not exist or cannot be written, and ValueError/TypeError raised by das-lab's own checks
    (modules that predate errors.py). A ValueError from inside torch is a bug.
    """
    from omegaconf.errors import MissingMandatoryValue

    from das_lab.models.weights import WeightsMismatchError

    if isinstance(error, MissingMandatoryValue):
        key = getattr(error, "full_key", None) or "a required value"
        return f"missing required value '{key}': pass {key}=VALUE on the command line"
    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        cause = one_line(error.__cause__)
        if cause is None:
            return None
        target = str(error).splitlines()[0].rstrip(":")
        return f"{type(error.__cause__).__name__}: {cause} ({target})"
    if isinstance(error, HydraException):
        return _hydra_message(error)
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
        return f"{error.strerror}: {error.filename}" if error.filename else str(error)
    if isinstance(error, (UserError, WeightsMismatchError, OmegaConfBaseException)):
        return str(error) or type(error).__name__
    if isinstance(error, (ValueError, TypeError, FileNotFoundError)) and _origin_is_das_lab(error):
        return str(error) or type(error).__name__
    return None


def _hydra_message(error: HydraException) -> str:
    """Hydra's own message in one line; an override of a key that does not exist suggests the closest one."""
    from das_lab.config import did_you_mean

    cause = error.__cause__
    lines = str(error).strip().splitlines() or [type(error).__name__]
    parent = getattr(cause, "parent_node", None)
    key, full_key = getattr(cause, "key", None), getattr(cause, "full_key", None)
    if isinstance(parent, DictConfig) and key is not None and full_key:
        close = did_you_mean(str(key), [str(k) for k in parent.keys()], str(full_key)[: -len(str(key))])
        if close:
            return f"{lines[0].rstrip('.')}: no such key{close}"
    extra = f" ({str(cause).splitlines()[0]})" if isinstance(cause, OmegaConfBaseException) else ""
    return " ".join(line.strip() for line in lines) + extra


def command_line(command: str, overrides: Sequence[str], *extra: str) -> str:
    """``das-lab COMMAND OVERRIDES... EXTRA...`` as a shell would take it, without the run-folder keys."""
    kept = [o for o in overrides if not o.startswith(("ckpt_path=", "hydra.run.dir=", "overwrite="))]
    return " ".join(shlex.quote(part) for part in ["das-lab", command, *kept, *extra])


def _is_writer() -> bool:
    from das_lab.pipeline import is_rank_zero

    return is_rank_zero()


def _only_hydra_files(run_dir: Path) -> bool:
    """True when the folder holds nothing but what Hydra wrote for this job (a fresh folder)."""
    job_log = f"{HydraConfig.get().job.name}.log"
    return all(entry.name in (".hydra", job_log) for entry in run_dir.iterdir())


def _remove_fresh_folder(run_dir: Path, log_dir: Path) -> None:
    """Remove a run folder the failed command created, and its parents left empty (inside ``log_dir``)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent != log_dir and log_dir in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


def wrap(task: Callable[[DictConfig, Run], Outcome], command: str) -> Callable[[DictConfig], Optional[float]]:
    """``task`` as a Hydra task function that owns the run's records, loggers and failure handling."""

    def job(cfg: DictConfig) -> Optional[float]:
        from das_lab.config import check_config
        from das_lab.loggers import close_loggers

        hydra_cfg = HydraConfig.get()
        run = Run(Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
        sweep = hydra_cfg.mode == RunMode.MULTIRUN
        writer = _is_writer()
        fresh = writer and _only_hydra_files(run.dir)
        try:
            check_config(cfg, hydra_cfg.overrides.task, hydra_cfg.runtime.choices)
            if writer:
                run.record.write_environment()
            outcome = task(cfg, run)
        except BaseException as error:
            close_loggers(run.loggers, failed=True, best=run.measured())
            signum = interrupting_signal(error)
            if signum is not None:
                raise Stop(_interrupted(run, command, signum, writer)) from error
            message = one_line(error)
            keep = sweep or run.started or message is None
            if writer and keep:
                _record_failure(run, error)
            elif fresh:
                _remove_fresh_folder(run.dir, Path(str(cfg.paths.log_dir)).absolute())
            if sweep and isinstance(error, Exception):
                log.error("job %s failed: %s (see %s/FAILED)", hydra_cfg.job.num, message or repr(error), run.dir)
                return math.nan
            raise Stop(error) from error
        if writer:
            run.record.completed(outcome.final, outcome.best, outcome.ckpt_best)
            log.info("run folder: %s", run.dir)
        close_loggers(run.loggers, failed=False, best=outcome.best)
        return outcome.objective

    job.__module__ = task.__module__
    job.__qualname__ = task.__qualname__
    return job


def _record_failure(run: Run, error: BaseException) -> None:
    """FAILED and a failed metrics.json, marked on the error so the screen can point at them."""
    try:
        run.record.failed(error, run.measured())
    except OSError as write_error:
        log.error("could not write the run record in %s: %s", run.dir, write_error)
        return
    error.das_lab_failed = run.record.failed_path  # type: ignore[attr-defined]


def _interrupted(run: Run, command: str, signum: signal.Signals, writer: bool) -> Interrupted:
    """Record the interruption and say how to continue: resume from last.ckpt, or rerun."""
    overrides = run.record.overrides
    if run.resume_checkpoint is not None and run.resume_checkpoint.is_file():
        hint = "resume with: " + command_line(command, overrides, f"hydra.run.dir={run.dir}", "ckpt_path=last")
    else:
        hint = "nothing to resume from yet; rerun with: " + command_line(command, overrides)
    if writer and run.started:
        try:
            run.record.interrupted(signum.name, run.measured())
        except OSError as write_error:
            log.error("could not write the run record in %s: %s", run.dir, write_error)
    return Interrupted(signum, hint)


class RunFolderGuard(Callback):
    """Before a single run writes anything: refuse to train into a used folder, send other commands'
    records to a subfolder of it, and check that the folder can be written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) != 0:
            return  # the ranks of a distributed run share rank 0's folder
        folder = Path(str(config.hydra.run.dir)).absolute()
        if (folder / ".hydra").is_dir():
            folder = self._used_folder(config, folder)
        probe_writable(folder, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        probe_writable(Path(str(config.hydra.sweep.dir)).absolute(), "hydra.sweep.dir")

    @staticmethod
    def _used_folder(config: DictConfig, folder: Path) -> Path:
        command = str(config.get("task_name"))
        if command != "train":
            own = folder / command / datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
            log.info("%s holds a run: das-lab %s writes its records to %s", folder, command, own)
            with read_write(config.hydra.run), open_dict(config.hydra.run):
                config.hydra.run.dir = str(own)
            return own
        if config.get("ckpt_path"):
            return folder
        if config.get("overwrite"):
            log.warning("overwrite=true: removing the earlier run in %s", folder)
            shutil.rmtree(folder)
            return folder
        raise Stop(
            RunFolderError(
                f"{folder} already holds a run; resume it with ckpt_path=last, replace it with overwrite=true, "
                f"or train into a new folder (drop hydra.run.dir)"
            )
        )


def probe_writable(folder: Path, key: str) -> None:
    """Create ``folder`` and write a file in it, or stop in one line naming the keys that move it.

    Hydra callbacks' exceptions are turned into warnings, hence :class:`Stop`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise Stop(
            RunFolderError(
                f"cannot write the run folder {folder} ({error.strerror}); choose a writable place with "
                f"{key}=DIR or the environment variable DAS_LAB_LOGS=DIR"
            )
        ) from error


def run_command(task: Callable[[DictConfig, Run], Outcome], config_name: str, command: str, args: Sequence[str]) -> int:
    """Run ``task`` as a Hydra app on das-lab's configs with ``args`` as its command line; the exit status.

    ``sys.argv`` stays the real command line (``das-lab train ...``): Lightning's DDP launcher
    re-runs it for the other ranks, pointing them at this run's folder.
    """
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser
    from hydra.core.utils import _flush_loggers

    from das_lab.cli import _rank_overrides, _register_resolvers
    from das_lab.config import config_dir
    from das_lab.sweeps import SweepFolder, failed_jobs

    _register_resolvers()
    SweepFolder.last = None
    version.setbase("1.3")
    parser = get_args_parser()
    parser.prog = f"das-lab {command}"
    parsed = parser.parse_args([*args, *_rank_overrides()])
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra hands every error to us: one line or a traceback, decided here
    try:
        _run_hydra(
            args=parsed,
            args_parser=parser,
            task_function=wrap(task, command),
            config_path=str(config_dir()),
            config_name=config_name,
        )
    except Stop as stop:
        return report_error(stop.error)
    except Interrupted as error:  # raised by the process launcher: the sweep stopped
        return report_error(error)
    except KeyboardInterrupt:
        print("das-lab: interrupted by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as error:
        return report_error(error)
    finally:
        _flush_loggers()
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    failed = failed_jobs(SweepFolder.last) if SweepFolder.last else []
    if failed:
        print(f"das-lab: {len(failed)} job(s) of the sweep failed:", *sorted(failed), sep="\n  ", file=sys.stderr)
        return 1
    return 0


def report_error(error: BaseException) -> int:
    """Print ``error``: one line for input errors (status 2), the traceback for bugs (status 1),
    how to go on for interruptions (128 + the signal number)."""
    if isinstance(error, Interrupted):
        print(f"das-lab: {error}", file=sys.stderr)
        return 128 + error.signum
    record = getattr(error, "das_lab_failed", None)
    message = one_line(error)
    if message is None:
        traceback.print_exception(error)
        if record is not None:
            print(f"das-lab: the traceback is also in {record}", file=sys.stderr)
        return 1
    where = f"\n  (full traceback: {record})" if record is not None else ""
    print(f"das-lab: error: {message}{where}", file=sys.stderr)
    return 2


def record_dead_job(job_dir: Path, overrides: list[str], returncode: int) -> str:
    """Record a sweep job whose process died (metrics.json ``failed`` with the signal, FAILED); say why."""
    from das_lab.run import RunRecord

    if returncode < 0 and -returncode in signal.valid_signals():
        died = f"killed by {signal.Signals(-returncode).name}"
    else:
        died = f"exited with status {returncode} without reporting a result"
    error = JobDied(
        f"the job's process was {died} (a segfault, kill -9 or the out-of-memory killer); "
        f"its last output is in the sweep's log"
    )
    record = RunRecord(job_dir, overrides)
    if not record.metrics_path.is_file():  # else the job wrote its own record (completed, interrupted) first
        record.failed(error)
    return str(error)
