"""`wyckoff-lab represent` subcommand (being written)."""


def register(subparsers) -> None:
    pass
