"""The config system: precedence, typed parsing, and errors that name the key, file and choices."""

import re
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
    for method in ("ddpm", "autoencoder", "lgt"):
        cfg = Config(method)
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
                                            ("--data.source=s3://bucket", "data.source"),
                                            ("--data.source=latents:", "data.source"),
                                            ("--train.lr=1e39", "train.lr"),
                                            ("--train.lr=inf", "train.lr"),
                                            ("--ddpm.cfg_scale=nan", "ddpm.cfg_scale"),
                                            ("--ddpm.eta=inf", "ddpm.eta"),
                                            ("--prepare.image_size=100", "prepare.image_size")])
def test_impossible_values_fail_naming_the_key(override, key):
    method = "lgt" if override.startswith(("--swd", "--prepare")) else "ddpm"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"--method.name={method}", override])


def test_each_method_has_its_own_sections_and_refuses_another_methods():
    assert {"ddpm", "model"} <= set(Config("ddpm").sections) and "lgt" not in Config("ddpm").sections
    assert {"lgt", "ode", "swd", "ssm", "prepare", "autoencoder", "model"} <= set(Config("lgt").sections)
    assert "ddpm" not in Config("lgt").sections and "model" not in Config("autoencoder").sections
    with pytest.raises(ConfigError, match=r"\[ddpm\] is a section of method ddpm, but method.name = 'lgt'"):
        load_config(None, ["--method.name=lgt", "--ddpm.timesteps=10"])


@pytest.mark.parametrize("old, new", [("autoencoder.prepare_crops", "prepare.crops"),
                                      ("lgt.autoencoder", "data.autoencoder"),
                                      ("sample.sampler", "ddpm.sampler"),
                                      ("sample.steps", "ddpm.sample_steps"),
                                      ("sample.cfg_scale", "ddpm.cfg_scale")])
def test_a_moved_key_names_its_new_place(tmp_path, old, new):
    section, key = old.split(".")
    path = write(tmp_path, f'[method]\nname = "lgt"\n[{section}]\n{key} = 1\n')
    with pytest.raises(ConfigError, match=rf"c\.toml: {re.escape(old)} moved to {re.escape(new)}"):
        load_config(path)


def test_method_name_on_the_command_line_picks_the_sections(tmp_path):
    path = write(tmp_path, '[method]\nname = "ddpm"\n[model]\nchannels = 8\n')
    cfg = load_config(path, ["--method.name=lgt", "--ode.steps=2"])
    assert cfg.method.name == "lgt" and cfg.ode.steps == 2 and cfg.model.channels == 8
    with pytest.raises(ConfigError, match="method.name = 'gan' is not one of"):
        load_config(None, ["--method.name=gan"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="--section.key=value"):
        load_config(None, ["--steps"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("method", ["ddpm", "autoencoder", "lgt"])
def test_resolved_config_round_trips_through_toml(tmp_path, method):
    cfg = load_config(None, [f"--method.name={method}", "--train.steps=5"])
    again = load_config(write(tmp_path, cfg.to_toml()))
    assert again == cfg and again.sections == cfg.sections


def test_every_shipped_config_is_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].glob("configs/*.toml"))
    assert configs, "configs/ is empty"
    for path in configs:
        load_config(path)


def test_print_config_prints_resolved_toml(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 9\n")
    out = subprocess.run([sys.executable, "-c", "from engine.commands.train import main; main()",
                          str(path), "--print-config", "--train.batch_size=5"],
                         capture_output=True, text=True, check=True).stdout
    resolved = tomllib.loads(out)
    assert resolved["train"]["steps"] == 9 and resolved["train"]["batch_size"] == 5


def test_cli_reports_config_errors_without_traceback(tmp_path):
    path = write(tmp_path, "[train]\nsteps = -1\n")
    proc = subprocess.run([sys.executable, "-m", "engine.commands.train", str(path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "train.steps" in proc.stderr and "Traceback" not in proc.stderr


def test_run_paths_are_made_absolute(tmp_path, monkeypatch):
    from engine.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_config(None, ["--data.source=latents:data/l.safetensors",
                                                 "--run.cache_dir=cache", "--data.autoencoder=ae/run"]))
    assert cfg.data.source == f"latents:{tmp_path / 'data' / 'l.safetensors'}"
    assert cfg.run.cache_dir == str(tmp_path / "cache")
    assert cfg.data.autoencoder == str(tmp_path / "ae" / "run")
    assert with_absolute_paths(load_config(None)).data.source == "builtin:textures"


def test_help_lists_every_key_of_every_method_with_its_default(capsys):
    from engine.commands.train import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for method in ("ddpm", "autoencoder", "lgt"):
        cfg = Config(method)
        for section, values in cfg.to_dict().items():
            for key, value in values.items():
                if key != "name":
                    assert f"{section}.{key} = {value!r}:" in text, f"{section}.{key}"
