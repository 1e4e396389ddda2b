"""Hyper-parameter search on Optuna: search space, shared study storage, trial bookkeeping, reports.

Optuna is the ``das-lab[search]`` extra: modules here import it on use, never at import time.
"""

from __future__ import annotations

# written by the sweeper into the search folder; `das-lab report` reads it to find the study
SEARCH_RECORD = "search.yaml"
INSTALL_HINT = "pip install 'das-lab[search]'"


class SearchConfigError(ValueError):
    """Bad search input (space, storage, study): reported as one line, without a traceback."""


def import_optuna():
    """The optuna module, or a one-line error that says which extra installs it."""
    try:
        import optuna
    except ImportError as error:
        raise SearchConfigError(f"hyper-parameter search needs Optuna ({error}): {INSTALL_HINT}") from None
    return optuna
