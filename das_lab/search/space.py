"""The search space: ``hydra.sweeper.params`` in Hydra's sweep syntax, as Optuna distributions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.errors import HydraException

from das_lab.search import SearchConfigError, import_optuna

SYNTAX = (
    "interval(LOW, HIGH), tag(log, interval(LOW, HIGH)), range(START, STOP[, STEP]), choice(A, B, ...) "
    "or a list A,B,..."
)


@dataclass
class SearchSpace:
    """What Optuna samples (``distributions``) and what every trial gets as it is (``fixed`` overrides)."""

    distributions: dict[str, Any] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    # the override key as written (``+key`` adds a key), per parameter name
    keys: dict[str, str] = field(default_factory=dict)

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """A trial's command-line overrides: the fixed ones, then its sampled values."""
        return [*self.fixed, *(f"{self.keys[name]}={_as_override(value)}" for name, value in params.items())]


def _as_override(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _where(line: str) -> str:
    return f"search space entry '{line}' (hydra.sweeper.params or the command line)"


def _choice(override: Override, line: str) -> Any:
    optuna = import_optuna()
    if override.value().shuffle:
        raise SearchConfigError(f"{_where(line)}: shuffle(...) has no meaning in a search; expected {SYNTAX}")
    return optuna.distributions.CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))


def _range(override: Override, line: str) -> Any:
    optuna = import_optuna()
    sweep = override.value()
    values = list(override.sweep_iterator())
    if sweep.shuffle or not values:
        raise SearchConfigError(f"{_where(line)}: expected a non-empty, unshuffled range(START, STOP[, STEP])")
    low, high, step = min(values), max(values), abs(sweep.step)
    if all(isinstance(v, int) for v in (*values, step)):
        return optuna.distributions.IntDistribution(low, high, step=step)
    return optuna.distributions.FloatDistribution(float(low), float(high), step=float(step))


def _interval(override: Override, line: str) -> Any:
    optuna = import_optuna()
    sweep = override.value()
    unknown = sweep.tags - {"log"}
    if unknown:
        raise SearchConfigError(
            f"{_where(line)}: unknown tag {', '.join(sorted(unknown))}; the only tag is log, "
            f"as in tag(log, interval(1e-4, 1e-2))"
        )
    log = "log" in sweep.tags
    if log and sweep.start <= 0:
        raise SearchConfigError(f"{_where(line)}: tag(log, ...) needs a positive lower bound, got {sweep.start}")
    if sweep.start >= sweep.end:
        raise SearchConfigError(f"{_where(line)}: interval(LOW, HIGH) needs LOW < HIGH")
    return optuna.distributions.FloatDistribution(float(sweep.start), float(sweep.end), log=log)


def parse_space(params: Mapping[str, Any], arguments: Sequence[str]) -> SearchSpace:
    """The space from the config's ``params`` and the command line (which wins for a key in both)."""
    lines = {str(key): f"{key}={value}" for key, value in params.items()}
    for argument in arguments:
        lines[argument.partition("=")[0].lstrip("+~")] = argument
    space = SearchSpace()
    parser = OverridesParser.create()
    for line in lines.values():
        try:
            (override,) = parser.parse_overrides([line])
        except HydraException as error:
            reason = str(error).strip().splitlines()[0]
            raise SearchConfigError(f"{_where(line)}: cannot read it ({reason}); expected {SYNTAX}") from None
        if not override.is_sweep_override():
            space.fixed.append(line)
            continue
        sweep = override.value()
        if isinstance(sweep, ChoiceSweep):
            distribution = _choice(override, line)
        elif isinstance(sweep, RangeSweep):
            distribution = _range(override, line)
        elif isinstance(sweep, IntervalSweep):
            distribution = _interval(override, line)
        else:
            raise SearchConfigError(
                f"{_where(line)}: {type(sweep).__name__} is not a search distribution; expected {SYNTAX}"
            )
        if sweep.tags and not isinstance(sweep, IntervalSweep):
            raise SearchConfigError(f"{_where(line)}: tag(log, ...) applies to interval(LOW, HIGH) only")
        name = override.key_or_group
        space.distributions[name] = distribution
        space.keys[name] = override.get_key_element()
    return space
