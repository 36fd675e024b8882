"""The science of Wyckoff Lab: symmetry, datasets, generators, relaxation, hulls and metrics. No UI here."""
