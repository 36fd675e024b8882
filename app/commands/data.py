"""`wyckoff-lab data` subcommand (being written)."""


def register(subparsers) -> None:
    pass
