"""das-lab's Hydra plugins; Hydra finds them by scanning the ``hydra_plugins`` namespace package."""
