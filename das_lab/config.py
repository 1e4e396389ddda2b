"""Where das-lab's Hydra configs live, and the checks a composed config passes before any command runs."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from types import UnionType
from typing import Any, Iterable, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf

from das_lab.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The folder holding train.yaml and the config groups.

    A wheel ships the configs inside the package (``das_lab/conf``); a checkout or an editable
    install reads the top-level ``conf/`` next to the package.
    """
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"das-lab configs not found: expected train.yaml in {_PACKAGE_DIR / 'conf'} (installed wheel) "
        f"or {_PACKAGE_DIR.parent / 'conf'} (checkout); reinstall das-lab with `pip install .`"
    )


def config_groups_help(config_name: str) -> str:
    """``group: option, ...`` for each group that ``conf/<config_name>.yaml`` composes (its --help)."""
    defaults = OmegaConf.load(config_dir() / f"{config_name}.yaml").get("defaults", [])
    groups = [next(iter(entry)) for entry in defaults if isinstance(entry, DictConfig)]
    lines = []
    for group in groups:
        if group.startswith(("hydra", "override ")):
            continue
        options = sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def check_config(cfg: DictConfig, overrides: Sequence[str], choices: Mapping[str, Any]) -> None:
    """Refuse, in one line, what no run could use: missing required values, added top-level keys that
    no config reads, and constructor arguments (``_target_`` nodes) of the wrong name or type."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        names = ", ".join(f"'{key}'" for key in missing)
        hint = " ".join(f"{key}=VALUE" for key in missing)
        raise ConfigError(
            f"missing required value{'s' if len(missing) > 1 else ''} {names}: pass {hint} on the command line"
        )
    _check_added_keys(cfg, overrides, choices)
    _check_targets(cfg, "")


def did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    """'; did you mean PREFIX+X?' for the candidate X closest to a mistyped ``name``, else ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _check_added_keys(cfg: DictConfig, overrides: Sequence[str], choices: Mapping[str, Any]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if (override.is_add() or override.is_force_add()) and "." not in key and key not in choices:
            known = [k for k in cfg if k != key]
            raise ConfigError(
                f"{override.input_line}: no das-lab config reads '{key}'{did_you_mean(key, known)} "
                f"(top-level keys: {', '.join(known)})"
            )


def _scalar_types(hint: Any) -> Optional[tuple[type, ...]]:
    """The types an argument accepts when they are all numbers or booleans, else None (not checked)."""
    arms = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    arms = tuple(arm for arm in arms if arm is not type(None))
    return arms if arms and all(arm in (int, float, bool) for arm in arms) else None


def _fits(value: Any) -> bool:
    """Numbers and booleans stand in for each other (libraries annotate ``int`` and take 0.5); text does not."""
    return value is None or isinstance(value, (int, float, bool))


def _check_targets(node: Any, path: str) -> None:
    """Walk the config; check each ``_target_`` node's keys against its constructor's signature."""
    if not isinstance(node, (DictConfig, ListConfig)) or node._is_missing() or node._is_none():
        return
    if isinstance(node, DictConfig) and "_target_" in node:
        _check_arguments(node, path)
    keys = range(len(node)) if isinstance(node, ListConfig) else node.keys()
    for key in keys:
        _check_targets(node._get_node(key), f"{path}{key}.")


def _check_arguments(node: DictConfig, path: str) -> None:
    from hydra._internal.utils import _locate

    target = str(node._target_)
    try:
        built = _locate(target)
        signature = inspect.signature(built)
    except (ImportError, TypeError, ValueError):
        return  # instantiation reports an unknown target itself
    try:
        hints = get_type_hints(built.__init__ if inspect.isclass(built) else built)
    except Exception:  # annotations that do not resolve outside their module: nothing to check against
        hints = {}
    params = signature.parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in node:
        key = str(key)
        if key.startswith("_"):
            continue
        if key not in params:
            if open_ended:
                continue
            choices = [name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
            hint = did_you_mean(key, choices) or f"; its arguments: {', '.join(choices)}"
            raise ConfigError(f"{path}{key}: not an argument of {target}{hint}")
        types = _scalar_types(hints.get(key))
        if types is None:
            continue
        try:
            value = node[key]
        except Exception:  # an interpolation that does not resolve yet; instantiation will say so
            continue
        if not _fits(value):
            expected = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{path}{key}={value!r}: expected {expected} (argument '{key}' of {target})")
