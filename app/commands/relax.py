"""`wyckoff-lab relax` subcommand (being written)."""


def register(subparsers) -> None:
    pass
