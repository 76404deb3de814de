"""The run configuration: one default per setting, the command line built from it, --config files."""
import argparse
import dataclasses
from pathlib import Path

import pytest

from evaluation import run
from evaluation.config import EPOCHS, ConfigError, RunConfig, from_command_line


def test_every_setting_is_an_option_with_its_default_in_the_help():
    parser = run.build_parser()
    flags = {a.dest: a for a in parser._actions}
    for f in RunConfig.fields():
        assert f.name in flags, f.name
        assert flags[f.name].default is argparse.SUPPRESS  # only what the command line says overrides a file
    help_text = " ".join(parser.format_help().split())
    assert "(default 32)" in help_text and "(default 30 frozen, 8 finetune)" in help_text
    assert "(default out)" in help_text and "(default imagenet)" in help_text


def test_defaults_live_once_and_resolve_per_mode():
    assert RunConfig(dataset="fruits").resolved().epochs == EPOCHS["frozen"]
    assert RunConfig(dataset="fruits", mode="finetune").resolved().epochs == EPOCHS["finetune"]
    assert RunConfig(dataset="fruits", epochs=3).resolved().epochs == 3
    parsed = run.parse_args(["--dataset", "fruits"])
    assert parsed == RunConfig(dataset="fruits").resolved()


def test_a_file_is_overridden_by_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: covid\nseeds: 0,1,2\ntrain-fraction: [1.0, 0.5]\nhidden: 0\nlr: 0.01\n")
    config = from_command_line(run.build_parser().parse_args(["--config", str(path), "--hidden", "64"]))
    assert (config.dataset, config.seeds, config.train_fraction, config.hidden, config.lr) == (
        "covid", [0, 1, 2], [1.0, 0.5], 64, 0.01)
    other = from_command_line(run.build_parser().parse_args(["--config", str(path), "--data-dir", str(tmp_path)]))
    assert other.dataset is None and other.data_dir == tmp_path  # naming other data replaces the file's


def test_a_saved_config_loads_back_equal(tmp_path):
    config = RunConfig(dataset="fruits", losses=["hinge"], seeds=[2, 3], plots=Path("p")).resolved()
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert RunConfig.load(path) == config


@pytest.mark.parametrize("text,message", [
    ("dataset: fruits\nbogus: 1\n", "unknown setting 'bogus'; the settings are dataset, data_dir"),
    ("dataset: fruits\nepochs: two\n", "epochs must be a whole number; got 'two'"),
    ("dataset: fruits\nepochs: 2.5\n", "epochs must be a whole number; got 2.5"),
    ("dataset: fruits\nseeds: [a]\n", "seeds must be a list of whole numbers"),
    ("dataset: fruits\ndrop_duplicates: maybe\n", "drop_duplicates must be a true or false"),
    ("- dataset\n", "must be a mapping of settings"),
    ("dataset: [fruits\n", "is not valid YAML"),
])
def test_bad_config_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"--config {path}.*" + message.replace("[", r"\[")):
        RunConfig.load(path)


def test_resolved_checks_name_the_option():
    with pytest.raises(ConfigError, match="--batch-size must be at least 1"):
        RunConfig(dataset="fruits", batch_size=0).resolved()
    with pytest.raises(ConfigError, match="--mode: invalid choice 'fine'"):
        RunConfig(dataset="fruits", mode="fine").resolved()
    with pytest.raises(ConfigError, match="give one of --dataset or --data-dir"):
        RunConfig().resolved()
    with pytest.raises(ConfigError, match="--shard must be I/N"):
        RunConfig(dataset="fruits", shard="3/2").resolved()
    assert dataclasses.replace(RunConfig(dataset="fruits"), shard="1/2").resolved().shard_parts == (1, 2)
