"""Metrics (ROCAUC and friends) and their pictures, computed on labeled test sets."""
