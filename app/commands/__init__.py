"""One module per `wyckoff-lab` subcommand group; each exposes `register(subparsers)`."""

# Modules are imported lazily by the CLI so `wyckoff-lab --help` stays fast (no torch import).
COMMAND_MODULES = ["data", "represent", "train", "sample", "relax", "hull", "discover", "evaluate", "bench", "app"]
