"""`wyckoff-lab evaluate` subcommand (being written)."""


def register(subparsers) -> None:
    pass
