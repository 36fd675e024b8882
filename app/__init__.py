"""Front ends of Wyckoff Lab: the `wyckoff-lab` command line and (later) the Dash app."""
