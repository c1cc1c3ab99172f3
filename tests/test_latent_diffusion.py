"""ddpm / fm / fmm on autoencoder latents: training on a latents file and on built-in latents, grids
and engine-sample decoded to pictures with the recorded scaling factor, clip_denoised following
the data; and the sample grids' noise, shared by the classes at each position."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_transfer import save_tiny_autoencoder
from torch import nn

from engine.autoencoders import load_autoencoder
from engine.checkpoint import latest_checkpoint
from engine.commands.sample import main as sample_main
from engine.config import describe_options, load_config
from engine.data.latents import AutoencoderIdentity, LatentFile, write_latents
from engine.methods import method_class
from engine.methods.ddpm import DDPM, DDPMConfig
from engine.methods.flow_map_matching import FlowMapConfig, FlowMapMatching
from engine.methods.flow_matching import FlowMatching, FlowMatchingConfig
from engine.methods.generation import grid_layout, grid_noise, noise, to_pictures
from engine.options import ConfigError
from engine.prepare import prepare
from engine.runs import load_run
from engine.train import train

CLASSES = ["a", "b", "c"]
LATENT_SHAPE = (4, 8, 8)  # the tiny autoencoder (f = 2) decodes them to 3 x 16 x 16
PICTURE_SIDE, PADDING = 16, 2
SCALING_FACTOR = 0.5
TINY = ["--model.channels=16", "--model.channel_mult=[1,2]", "--model.attention_resolutions=[4]",
        "--model.num_res_blocks=1", "--model.num_groups=8", "--model.num_heads=2", "--train.batch_size=4",
        "--train.warmup_steps=1", "--train.steps=2", "--sample.every=2", "--sample.num=6", "--log.every=1",
        "--log.tensorboard=false", "--train.device=cpu", "--eval.per_class=2"]
SECTION_STEPS = {"ddpm": ["--ddpm.timesteps=20", "--ddpm.sample_steps=2"], "fm": ["--fm.sample_steps=2"],
                 "fmm": ["--fmm.sample_steps=2"]}


def grid_size(rows: int, columns: int, side: int = PICTURE_SIDE) -> tuple[int, int]:
    """(width, height) of a PNG grid of `side` px cells."""
    return columns * (side + PADDING) + PADDING, rows * (side + PADDING) + PADDING


def latent_config(run: Path, latents: Path, method: str, *extra: str):
    return load_config(None, [f"--method.name={method}", f"--data.source=latents:{latents}", f"--run.dir={run}",
                              *TINY, *SECTION_STEPS[method], *extra])


@pytest.fixture(scope="module")
def latents_file(tmp_path_factory) -> tuple[Path, Path]:
    """(latents file of 12 synthetic latents in 3 classes, scaled by SCALING_FACTOR, the tiny
    autoencoder it records)."""
    root = tmp_path_factory.mktemp("latent-diffusion")
    autoencoder = save_tiny_autoencoder(root / "autoencoder")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(12, *LATENT_SHAPE, generator=generator) * 2 + torch.arange(12).view(12, 1, 1, 1) % 3
    path = root / "latents.safetensors"
    write_latents(path, LatentFile(latents.half(), torch.arange(12) % 3, CLASSES, SCALING_FACTOR,
                                   AutoencoderIdentity(str(autoencoder), "synthetic"), "mean"))
    return path, autoencoder


@pytest.fixture(scope="module")
def ddpm_latent_run(latents_file, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ddpm-latent") / "run"
    train(prepare(latent_config(run, latents_file[0], "ddpm", "--ddpm.prediction=v")))
    return run


# ----------------------------------------------------------------------------- training on latents


def test_ddpm_trains_on_a_latents_file_and_its_grid_is_decoded(ddpm_latent_run):
    with Image.open(ddpm_latent_run / "samples" / "step-0000002.png") as grid:
        # 6 cells, one column per class: pictures of 16 px, not latents of 8
        assert grid.size == grid_size(2, len(CLASSES)) and grid.mode == "RGB"


def test_the_scaling_factor_is_recorded_and_divides_the_latents_on_decode(ddpm_latent_run, latents_file):
    assert latest_checkpoint(ddpm_latent_run / "checkpoints").model_state()["scaling_factor"] == SCALING_FACTOR
    run = load_run(ddpm_latent_run, "cpu")
    assert run.method.scaling_factor == SCALING_FACTOR and run.method.latent
    latents = torch.randn(2, *LATENT_SHAPE)
    autoencoder, _ = load_autoencoder(latents_file[1])
    expected = autoencoder.decode(latents / SCALING_FACTOR).clamp(-1, 1)
    torch.testing.assert_close(to_pictures(run.method, latents, True, strict=True), expected)


def test_pixel_runs_keep_the_scaling_factor_out_of_their_checkpoints():
    method = DDPM(nn.Identity(), (3, 4, 4), 0, DDPMConfig(timesteps=10))
    assert "scaling_factor" not in method.state_dict() and not method.latent


def test_engine_sample_on_a_latent_run_writes_decoded_pictures(ddpm_latent_run, tmp_path, capsys):
    out = tmp_path / "samples.png"
    assert sample_main(["--checkpoint", str(ddpm_latent_run), "--out", str(out), "--n", "4", "--nrow", "2",
                        "--steps", "2", "--labels", "a,c", "--device", "cpu"]) == 0
    with Image.open(out) as grid:
        assert grid.size == grid_size(2, 2) and grid.mode == "RGB"
        assert np.asarray(grid).std() > 0
    assert f"wrote {out}" in capsys.readouterr().out


def test_engine_sample_without_the_autoencoder_says_to_pass_one(ddpm_latent_run, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert sample_main(["--checkpoint", str(ddpm_latent_run), "--out", str(out), "--steps", "2",
                        "--autoencoder", str(tmp_path / "gone"), "--device", "cpu"]) == 1
    error = capsys.readouterr().err
    assert "the autoencoder that made these latents is missing" in error and "--autoencoder" in error
    assert not out.exists()


@pytest.mark.parametrize("method", ["fm", "fmm"])
def test_flows_train_evaluate_and_sample_on_latents(method, latents_file, tmp_path, capsys):
    run = tmp_path / method
    train(prepare(latent_config(run, latents_file[0], method)))
    with Image.open(run / "samples" / "step-0000002.png") as grid:
        assert grid.size == grid_size(2, len(CLASSES))
    assert "eval/swd" in (run / "metrics.jsonl").read_text().splitlines()[-1]  # compared in latent space
    out = tmp_path / "samples.png"
    assert sample_main(["--checkpoint", str(run), "--out", str(out), "--n", "2", "--nrow", "2",
                        "--steps", "2", "--device", "cpu"]) == 0
    with Image.open(out) as pictures:
        assert pictures.size == grid_size(1, 2)


def test_latent_option_prepares_and_trains_on_builtin_texture_latents(tmp_path):
    cfg = load_config(None, [
        "--method.name=ddpm", "--ddpm.latent=true", f"--run.dir={tmp_path / 'run'}",
        f"--run.cache_dir={tmp_path / 'cache'}", "--autoencoder.channels=8", "--autoencoder.channel_mult=[1, 2]",
        "--autoencoder.num_groups=4", "--prepare.autoencoder_steps=2", "--prepare.autoencoder_batch_size=2",
        "--prepare.autoencoder_image_size=16", "--prepare.image_size=16", "--prepare.crops=6",
        *TINY, *SECTION_STEPS["ddpm"], "--sample.num=2", "--eval.at_end=false"])
    resolved = prepare(cfg)
    assert resolved.data.source.startswith("latents:") and resolved.data.autoencoder
    assert method_class("ddpm").trains_on_latents(resolved)
    train(resolved)
    with Image.open(tmp_path / "run" / "samples" / "step-0000002.png") as grid:
        assert grid.size == grid_size(1, 2)  # 16 px pictures decoded from 8 x 8 latents


def test_latent_option_needs_a_source_that_can_be_made_latents(tmp_path):
    with pytest.raises(ConfigError, match=r"fm.latent = True needs data.source = 'builtin:textures'"):
        load_config(None, ["--method.name=fm", "--fm.latent=true", "--data.source=builtin:digits"])
    with pytest.raises(ConfigError, match="prepare.image_size"):
        load_config(None, ["--method.name=ddpm", "--ddpm.latent=true", "--prepare.image_size=20"])


# ----------------------------------------------------------------------------- clip_denoised


class ConstantX0(nn.Module):
    """An x0-predicting stand-in network whose prediction lies outside [-1, 1]."""

    def forward(self, x, t, labels=None):
        return torch.full_like(x, 3.0)


@pytest.mark.parametrize("clip_denoised, latent_scaling, expected", [
    ("auto", None, 1.0), ("auto", SCALING_FACTOR, 3.0), (True, SCALING_FACTOR, 1.0), (False, None, 3.0)])
def test_clip_denoised_auto_clamps_pixels_and_leaves_latents(clip_denoised, latent_scaling, expected):
    settings = DDPMConfig(timesteps=10, prediction="x0", clip_denoised=clip_denoised)
    method = DDPM(ConstantX0(), (4, 2, 2), 0, settings, latent_scaling=latent_scaling)
    x0, _ = method.denoise(torch.zeros(1, 4, 2, 2), 5)
    assert torch.all(x0 == expected)


def test_clip_denoised_takes_toml_booleans_and_auto_and_help_shows_them(tmp_path):
    for value, expected in (("true", True), ("false", False), ('"auto"', "auto")):
        path = tmp_path / "c.toml"
        path.write_text(f'[method]\nname = "ddpm"\n[ddpm]\nclip_denoised = {value}\n')
        assert load_config(path).ddpm.clip_denoised == expected
    with pytest.raises(ConfigError, match="clip_denoised = 'sometimes' is not one of 'auto', True, False"):
        load_config(None, ["--method.name=ddpm", "--ddpm.clip_denoised=sometimes"])
    assert "ddpm.clip_denoised = 'auto'" in describe_options()


# ----------------------------------------------------------------------------- grid noise


def positions(labels: torch.Tensor) -> list[int]:
    """Each cell's rank among the earlier cells of its class."""
    seen: dict[int, int] = {}
    ranks = []
    for label in labels.tolist():
        ranks.append(seen.get(label, 0))
        seen[label] = ranks[-1] + 1
    return ranks


@pytest.mark.parametrize("num, num_classes", [(16, 3), (24, 12), (16, 20), (9, 1)])
def test_grid_noise_is_shared_by_the_classes_at_a_position_and_differs_between_positions(seed, num,
                                                                                          num_classes):
    labels, _ = grid_layout(num, num_classes)
    x = grid_noise(labels, (num, 2, 3, 3), torch.Generator().manual_seed(seed), torch.device("cpu"))
    rank = positions(labels)
    for i in range(num):
        for j in range(num):
            assert torch.equal(x[i], x[j]) == (rank[i] == rank[j])
    again = grid_noise(labels, (num, 2, 3, 3), torch.Generator().manual_seed(seed), torch.device("cpu"))
    assert torch.equal(x, again)


def test_unconditional_grid_noise_is_one_draw_per_cell(seed):
    x = grid_noise(None, (5, 2, 3, 3), torch.Generator().manual_seed(seed), torch.device("cpu"))
    assert torch.equal(x, noise((5, 2, 3, 3), torch.Generator().manual_seed(seed), torch.device("cpu")))


class IgnoresLabels(nn.Module):
    """A stand-in network that ignores its class: (x, t, labels) or (x, s, t, labels) -> 0.5 x."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, *times_and_labels):
        return x * self.weight


METHODS = {
    "ddpm": lambda: DDPM(IgnoresLabels(), (1, 4, 4), 3, DDPMConfig(timesteps=10, sample_steps=2), grid_size=6),
    "fm": lambda: FlowMatching(IgnoresLabels(), (1, 4, 4), 3, FlowMatchingConfig(sample_steps=2), grid_size=6),
    "fmm": lambda: FlowMapMatching(IgnoresLabels(), (1, 4, 4), 3, FlowMapConfig(sample_steps=2), grid_size=6),
}


@pytest.mark.parametrize("name", METHODS)
def test_a_grid_shows_an_ignored_class_as_identical_cells(name, seed):
    """6 cells, one column per class: with conditioning ignored, a row's cells are identical."""
    images, per_row = METHODS[name]().sample_grid(None, torch.Generator().manual_seed(seed))
    assert per_row == 3
    rows = images.view(2, 3, -1)
    assert all(torch.equal(row[0], row[c]) for row in rows for c in (1, 2))
    assert not torch.equal(rows[0, 0], rows[1, 0])
