"""Training settings from TOML files, flags and --set overrides, for any generator with a TrainingRecipe."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from wyckoff_lab.core.configs import ConfigError, load_config


@dataclass
class _Inner:
    width: int = 8
    rate: float = 0.1
    kind: str = "a"


@dataclass
class _Outer:
    name: str = "run"
    limit: float | None = None
    verbose: bool = False
    inner: _Inner = field(default_factory=_Inner)


def test_file_then_overrides_typed_by_field(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('name = "from-file"\nlimit = 2.5\n[inner]\nwidth = 16\nkind = "b"\n')
    config = load_config(_Outer, path, ["inner.width=32", "verbose=true", "limit=none"])
    assert config == _Outer(name="from-file", limit=None, verbose=True, inner=_Inner(width=32, rate=0.1, kind="b"))
    assert isinstance(config.inner.width, int)


@pytest.mark.parametrize("overrides, words", [
    (["inner.depth=3"], "unknown setting 'inner.depth'"),
    (["inner.width=2.5"], "inner.width must be int"),
    (["inner=3"], "inner is a section"),
    (["name.x=1"], "name is a single setting"),
    (["width"], "--set wants key=value"),
    (["verbose=maybe"], "verbose must be bool"),
])
def test_overrides_that_do_not_fit_are_refused(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(_Outer, None, overrides)


def test_bad_files_are_refused(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_Outer, broken)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[inner]\nheight = 3\n")
    with pytest.raises(ConfigError, match="unknown setting inner.height"):
        load_config(_Outer, unknown)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(_Outer, tmp_path / "missing.toml")


def test_train_command_reads_a_config_file_for_the_transformer(tmp_path):
    """The real command line of the registered recipe: the file, then flags, then --set (no training run)."""
    from wyckoff_lab.app.cli import build_parser
    from wyckoff_lab.app.commands.train import training_config

    path = tmp_path / "small.toml"
    path.write_text("epochs = 3\nlr = 3e-4\n[model]\nd_model = 64\nn_heads = 4\nn_layers = 2\n")
    args = build_parser().parse_args(["train", "wyckoff-transformer", "--config", str(path), "--out",
                                      str(tmp_path / "run"), "--epochs", "5", "--set", "model.n_layers=3"])
    config = training_config("wyckoff-transformer", args)
    assert (config.epochs, config.lr, config.out_dir) == (5, 3e-4, str(tmp_path / "run"))
    assert (config.model.d_model, config.model.n_heads, config.model.n_layers) == (64, 4, 3)
