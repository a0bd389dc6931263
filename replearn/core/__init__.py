"""Plumbing every stage shares: configs (frozen dataclasses, key=value, presets), artifact keys and the Stage,
per-artifact locks, the HDF5 image and feature files, atomic writes and provenance, figure helpers."""
