"""The error every part of the anomaly models raises for the user: its own module, so that the
model files, tiles, torchrun and classifier code name it without importing the backbones."""

from __future__ import annotations


class ModelError(ValueError):
    """A model that cannot be built or loaded, with a one-line message meant for the user."""
