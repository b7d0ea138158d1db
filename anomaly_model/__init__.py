"""Anomaly models: the backbone that turns images into patch features, and PaDiM on top of it."""
