"""engine-sample: a trained diffusion run -> a PNG grid, with DDPM and DDIM."""

import numpy as np
import pytest
from PIL import Image
from test_train import tiny_config

from engine.commands.sample import main as sample_main
from engine.train import train


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddpm") / "run"
    train(tiny_config(run, "--train.steps=2", "--sample.every=0"))
    return run


@pytest.mark.parametrize("sampler, extra", [("ddpm", []), ("ddim", ["--steps", "5", "--eta", "0.5"])])
def test_writes_a_png_grid(ddpm_run, tmp_path, sampler, extra, capsys):
    out = tmp_path / f"{sampler}.png"
    sample_main(["--checkpoint", str(ddpm_run), "--out", str(out), "--n", "6", "--nrow", "3",
                 "--sampler", sampler, "--cfg", "1.5", "--labels", "brick,0", *extra])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 + 2 * 18, 2 + 3 * 18, 3)  # 2 rows x 3 columns of 16 px with 2 px padding
    assert grid.std() > 0
    assert sampler in capsys.readouterr().out


def test_ddim_with_eta_zero_is_reproducible(ddpm_run, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        sample_main(["--checkpoint", str(ddpm_run), "--out", str(path), "--n", "2", "--steps", "4", "--seed", "3"])
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(paths[1])))


def test_unknown_label_and_missing_run_are_clear_errors(ddpm_run, tmp_path, capsys):
    assert sample_main(["--checkpoint", str(ddpm_run), "--out", str(tmp_path / "x.png"), "--labels", "marble"]) == 1
    assert "engine-sample: error: --labels: 'marble'" in capsys.readouterr().err
    assert sample_main(["--checkpoint", str(tmp_path / "nowhere")]) == 1
    assert "engine-sample: error: no checkpoint found" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--n", "0"], ["--steps", "0"], ["--eta", "-1"], ["--nrow", "-1"]])
def test_impossible_sampler_arguments_are_refused(ddpm_run, tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--checkpoint", str(ddpm_run), "--out", str(tmp_path / "x.png"), *bad])
    assert exit_info.value.code == 2 and "must be >=" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_an_autoencoder_for_a_run_on_pictures_is_a_usage_error(ddpm_run, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert sample_main(["--checkpoint", str(ddpm_run), "--out", str(out), "--autoencoder", str(tmp_path)]) == 2
    assert "trained on pictures, not latents" in capsys.readouterr().err and not out.exists()
