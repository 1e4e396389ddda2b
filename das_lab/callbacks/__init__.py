"""Lightning callbacks of das-lab (``conf/callbacks``)."""

from das_lab.callbacks.visualize import AttentionVisualizer

__all__ = ["AttentionVisualizer"]
