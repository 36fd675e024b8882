"""Shipped assets of Wyckoff Lab: trained model weights (safetensors + JSON config) under `models/`."""
