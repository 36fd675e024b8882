"""`wyckoff-lab hull` subcommand (being written)."""


def register(subparsers) -> None:
    pass
