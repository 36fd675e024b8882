"""`wyckoff-lab train`: train a generator on a dataset (resumable; weights exported as safetensors + JSON).

Each registered generator with a `TrainingRecipe` gets a subcommand; its settings are the fields of the recipe's
config dataclass: top-level ones as flags (`--epochs 10`), any one with `--set model.d_model=256`, or all of them
from `--config FILE.toml` (flags and --set override the file).
"""

from __future__ import annotations

import dataclasses

# Settings with a flag of their own whatever the model (the run folder is every recipe's `out_dir`).
OUT_FLAG = "--out"


def register(subparsers) -> None:
    from wyckoff_lab.core.configs import config_fields
    from wyckoff_lab.core.generators import available_generators, generator_class

    parser = subparsers.add_parser("train", help="train a generative model",
                                   description="Train a generator's model. Settings: the flags below, "
                                               "--set section.key=value for any field, or --config FILE.toml.")
    sub = parser.add_subparsers(dest="model_name", metavar="MODEL", required=True)
    for name in available_generators():
        cls = generator_class(name)
        if cls.training is None:
            continue
        config_class, _ = cls.training.load()
        p = sub.add_parser(name, help=cls.description or name)
        p.add_argument("--config", default=None, metavar="FILE.toml", help="settings file (TOML; sections for nested "
                                                                           "settings, e.g. [model])")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="one setting, e.g. model.d_model=256 or lr=3e-4 (repeatable; applied last)")
        defaults = config_class()
        for field_name, field in config_fields(config_class).items():
            if dataclasses.is_dataclass(getattr(defaults, field_name)):
                continue  # a section: --set or --config
            flag = OUT_FLAG if field_name == "out_dir" else "--" + field_name.replace("_", "-")
            p.add_argument(flag, dest=f"setting_{field_name}", default=None, metavar="VALUE",
                           help=f"{field_name} (default {getattr(defaults, field_name)!r})")
        p.add_argument("--install", action="store_true", help="copy the best weights into assets/models when done")
        if cls.has_learned_embeddings:
            p.add_argument("--embeddings", default=None, help="also write the learned embeddings (npz) here")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_train, generator_name=name)


def training_config(name: str, args):
    """The recipe's config for `wyckoff-lab train <name>` from --config, the flags and --set, checked."""
    from wyckoff_lab.app.cli import CommandError
    from wyckoff_lab.core.configs import ConfigError, load_config
    from wyckoff_lab.core.generators import generator_class

    config_class, _ = generator_class(name).training.load()
    flags = [f"{key.removeprefix('setting_')}={value}" for key, value in vars(args).items()
             if key.startswith("setting_") and value is not None]
    try:
        config = load_config(config_class, args.config, flags + list(args.overrides))
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    problems = config.problems() if hasattr(config, "problems") else []
    if problems:
        raise CommandError("unusable training settings: " + "; ".join(problems))
    return config


def _train(args) -> int:
    import shutil
    from pathlib import Path

    from wyckoff_lab.app.cli import emit
    from wyckoff_lab.core.generators import generator_class, get_generator, weights_folder

    recipe = generator_class(args.generator_name).training
    config = training_config(args.generator_name, args)
    _, train = recipe.load()
    result = train(config, progress=not args.json)
    best = Path(config.out_dir) / "best"
    if args.install:
        target = weights_folder(recipe.weights_name)
        target.mkdir(parents=True, exist_ok=True)
        for path in best.iterdir():
            if path.is_file():
                shutil.copy2(path, target / path.name)
        result["installed"] = str(target)
    if getattr(args, "embeddings", None):
        generator = get_generator(args.generator_name, weights=str(best), device="cpu")
        write_embeddings(generator.learned_embeddings(), args.embeddings)
        result["embeddings"] = args.embeddings
    emit(result, args.json, f"trained {result.get('epochs_done')} epochs, {result.get('steps')} steps; "
                            f"best validation loss {result.get('best_val_loss', float('nan')):.4f}")
    return 0


def write_embeddings(embeddings: dict, path) -> None:
    """`Generator.learned_embeddings()` as a compressed npz: <kind>_labels and <kind>_vectors per kind."""
    import numpy as np

    arrays = {}
    for kind, (labels, vectors) in embeddings.items():
        arrays[f"{kind}_labels"] = np.array([str(label) for label in labels])
        arrays[f"{kind}_vectors"] = vectors
    np.savez_compressed(path, **arrays)
