"""The config system: precedence, typed parsing, and errors that name the key, file and choices."""

import subprocess
import sys

import pytest
import tomllib

from engine.config import Config, ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_precedence_is_cli_over_toml_over_defaults(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 7\nbatch_size = 3\n")
    cfg = load_config(path, ["--train.steps=20"])
    assert cfg.train.steps == 20  # CLI beats TOML
    assert cfg.train.batch_size == 3  # TOML beats default
    assert cfg.train.lr == Config().train.lr  # default otherwise


def test_stable_key_names_exist():
    cfg = Config()
    for dotted in ("run.dir", "run.seed", "train.steps", "train.batch_size", "train.device",
                   "checkpoint.every", "checkpoint.keep", "data.source", "log.every", "sample.every"):
        section, key = dotted.split(".")
        assert hasattr(getattr(cfg, section), key), dotted


def test_override_values_are_parsed_as_toml_with_string_fallback():
    cfg = load_config(None, ["--train.betas=[0.8, 0.9]", "--run.dir=runs/x", "--train.ema_warmup=false",
                             "--train.lr=1e-3", "--run.dir=123"])
    assert cfg.train.betas == [0.8, 0.9]
    assert cfg.train.ema_warmup is False
    assert cfg.train.lr == 1e-3
    assert cfg.run.dir == "123"  # a string field keeps a number-looking value as text


def test_int_accepted_for_float_but_not_float_for_int(tmp_path):
    assert load_config(write(tmp_path, "[train]\nlr = 1\n")).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"c\.toml: train\.steps must be an integer"):
        load_config(write(tmp_path, "[train]\nsteps = 1.5\n"))


def test_unknown_key_names_file_and_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "[train]\nstepz = 3\n"))
    message = str(err.value)
    assert "c.toml" in message and "train.stepz" in message and "steps" in message and "batch_size" in message


def test_unknown_section_lists_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[trian\].*train"):
        load_config(write(tmp_path, "[trian]\nsteps = 3\n"))


def test_bad_choice_lists_choices():
    with pytest.raises(ConfigError, match=r"train\.device = 'gpu' is not one of 'auto', 'cpu', 'cuda'"):
        load_config(None, ["--train.device=gpu"])


@pytest.mark.parametrize("override, key", [("--train.steps=0", "train.steps"),
                                            ("--ddpm.label_drop_prob=1.5", "ddpm.label_drop_prob"),
                                            ("--swd.kernel_size=4", "swd.kernel_size"),
                                            ("--data.source=s3://bucket", "data.source")])
def test_impossible_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="--section.key=value"):
        load_config(None, ["--steps"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, ["--train.steps=5", "--model.channel_mult=[1,3]"])
    again = load_config(write(tmp_path, cfg.to_toml()))
    assert again == cfg


def test_every_shipped_config_is_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].glob("configs/*.toml"))
    assert configs, "configs/ is empty"
    for path in configs:
        load_config(path)


def test_print_config_prints_resolved_toml(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 9\n")
    out = subprocess.run([sys.executable, "-c", "from engine.cli import train_main; train_main()",
                          str(path), "--print-config", "--train.batch_size=5"],
                         capture_output=True, text=True, check=True).stdout
    resolved = tomllib.loads(out)
    assert resolved["train"]["steps"] == 9 and resolved["train"]["batch_size"] == 5


def test_cli_reports_config_errors_without_traceback(tmp_path):
    path = write(tmp_path, "[train]\nsteps = -1\n")
    proc = subprocess.run([sys.executable, "-c", "from engine.cli import train_main; train_main()", str(path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "train.steps" in proc.stderr and "Traceback" not in proc.stderr


def test_run_paths_are_made_absolute(tmp_path, monkeypatch):
    from engine.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_config(None, ["--data.source=latents:data/l.safetensors",
                                                 "--run.cache_dir=cache", "--lgt.autoencoder=ae/run"]))
    assert cfg.data.source == f"latents:{tmp_path / 'data' / 'l.safetensors'}"
    assert cfg.run.cache_dir == str(tmp_path / "cache")
    assert cfg.lgt.autoencoder == str(tmp_path / "ae" / "run")
    assert with_absolute_paths(load_config(None)).data.source == "builtin:textures"
