"""Anomaly models: the backbone that turns images into patch features, and the anomaly models on top of it (PaDiM, PatchCore)."""
