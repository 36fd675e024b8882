"""Reusable Dash components of Wyckoff Lab, each usable alone in Jupyter."""
