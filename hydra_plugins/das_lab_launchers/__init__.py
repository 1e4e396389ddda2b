"""das-lab's Hydra launchers: Hydra loads launcher classes only from the ``hydra_plugins`` package."""
