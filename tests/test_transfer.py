"""engine-transfer on a tiny trained LGT run: PNG grids from images and from latents, the
evaluation table, and the errors a user meets."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import checkpoint as ckpt
from engine.commands import sample as sample_command
from engine.commands import transfer as transfer_command
from engine.commands.transfer import main
from engine.config import load_config
from engine.encode import encode_folder
from engine.methods.autoencoder import AutoencoderMethod
from engine.models.autoencoder import build_autoencoder
from engine.pictures import save_grid
from engine.prepare import prepare
from engine.train import train

STYLES = ("dots", "stripes", "warm")
IMAGE_SIDE, PADDING = 16, 2  # the tiny autoencoder halves the side: latents 4 x 8 x 8



def style_picture(style: str, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[:IMAGE_SIDE, :IMAGE_SIDE]
    noise = rng.uniform(0, 60, (IMAGE_SIDE, IMAGE_SIDE, 3))
    if style == "dots":
        base = np.where(((x % 4) < 2) & ((y % 4) < 2), 220, 30)[..., None].repeat(3, 2)
    elif style == "stripes":
        stripe = x % 6 < 3
        base = np.stack([np.where(stripe, 200, 40), np.full_like(x, 120), np.where(stripe, 40, 200)], -1)
    else:
        base = np.stack([np.full_like(x, 220), 100 + 5 * y, np.full_like(x, 40)], -1)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def save_tiny_autoencoder(run_dir: Path) -> Path:
    """An (untrained) f=2 KL autoencoder saved as an engine autoencoder run."""
    cfg = load_config(None, ["--method.name=autoencoder", "--autoencoder.channels=8",
                             "--autoencoder.channel_mult=[1,2]", "--autoencoder.num_groups=4",
                             f"--run.dir={run_dir}"])
    method = AutoencoderMethod(build_autoencoder(cfg.autoencoder, (3, IMAGE_SIDE, IMAGE_SIDE)))
    ckpt.save_checkpoint(run_dir / "checkpoints", 1, model_state=method.state_dict(), ema_state=None,
                         train_state={}, config=cfg,
                         data_info={"sample_shape": [3, IMAGE_SIDE, IMAGE_SIDE], "class_names": list(STYLES)},
                         keep=1)
    return run_dir


@pytest.fixture(scope="module")
def lgt_run(tmp_path_factory):
    """(run directory, image folder, latents file) of an LGT run trained for 3 steps."""
    root = tmp_path_factory.mktemp("transfer")
    rng = np.random.default_rng(int(torch.randint(2**31, ())))
    images = root / "images"
    for style in STYLES:
        (images / style).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(style_picture(style, rng)).save(images / style / f"{i}.png")
    autoencoder = save_tiny_autoencoder(root / "autoencoder")
    latents = root / "latents.safetensors"
    encode_folder(images, autoencoder, latents, image_size=IMAGE_SIDE, device="cpu", workers=1)
    run = root / "lgt"
    cfg = load_config(None, ["--method.name=lgt", f"--data.source=latents:{latents}", f"--run.dir={run}",
                             "--train.device=cpu", "--train.steps=3", "--train.batch_size=4",
                             "--train.warmup_steps=1", "--model.channels=16", "--model.channel_mult=[1,2]",
                             "--model.attention_resolutions=[4]", "--model.num_res_blocks=1",
                             "--model.num_groups=8", "--model.num_heads=2", "--ode.steps=2",
                             "--swd.num_projections=8", "--ssm.max_spatial_samples=16",
                             "--lgt.holdout_per_style=1", "--sample.every=3", "--sample.num=2",
                             "--log.every=1", "--log.tensorboard=false"])
    train(prepare(cfg))
    return run, images, latents


def grid_shape(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) of a PNG grid of IMAGE_SIDE cells."""
    return columns * (IMAGE_SIDE + PADDING) + PADDING, rows * (IMAGE_SIDE + PADDING) + PADDING


def test_training_grid_decodes_with_the_runs_autoencoder(lgt_run):
    run, _, _ = lgt_run
    with Image.open(run / "samples" / "step-0000003.png") as grid:
        assert grid.size == grid_shape(2, 1 + len(STYLES))


def test_transfer_of_one_image_to_every_style_writes_a_grid(lgt_run, tmp_path, capsys):
    run, images, _ = lgt_run
    out = tmp_path / "one.png"
    assert main(["--checkpoint", str(run), "--content", str(images / "dots" / "0.png"), "--style", "all",
                 "--cfg", "2.0", "--out", str(out), "--device", "cpu"]) == 0
    with Image.open(out) as grid:
        assert grid.size == grid_shape(1, 1 + len(STYLES)) and grid.mode == "RGB"
    assert f"wrote {out}" in capsys.readouterr().out


def test_transfer_of_a_folder_and_of_latent_rows_to_named_styles(lgt_run, tmp_path):
    run, images, latents = lgt_run
    out = tmp_path / "folder.png"
    assert main(["--checkpoint", str(run), "--content", str(images / "warm"), "--style", "stripes,0",
                 "--out", str(out), "--steps", "3", "--solver", "rk4", "--device", "cpu"]) == 0
    with Image.open(out) as grid:
        assert grid.size == grid_shape(4, 1 + 2)  # 4 images x (content + 2 styles)
    out = tmp_path / "rows.png"
    assert main(["--checkpoint", str(run), "--content-latents", str(latents), "--rows", "0,5,9",
                 "--style", "warm", "--out", str(out), "--device", "cpu"]) == 0
    with Image.open(out) as grid:
        assert grid.size == grid_shape(3, 1 + 1)


def evaluation_table(out: str) -> tuple[list[str], list[str]]:
    """(the per-style rows, the quality block) of engine-transfer --eval's output."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["style"])
    blank = lines.index("", header)
    return lines[header:blank], lines[blank + 1:]


def test_eval_prints_a_row_per_style_and_the_quality_table_against_identity_and_swap(lgt_run, capsys):
    run, _, _ = lgt_run
    assert main(["--checkpoint", str(run), "--eval", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    per_style, quality = evaluation_table(out)
    assert per_style[0].split() == ["style", "swd_before", "swd_after", "ssm", "style_acc"]
    assert [line.split()[0] for line in per_style[1:]] == list(STYLES)
    assert all(float(value) >= 0 for line in per_style[1:] for value in line.split()[1:])
    assert quality[1].split() == ["metric", "identity", "swap", "LGT"]
    rows = {line.split("(")[0].strip(): line.split(")")[-1].split() for line in quality[2:5]}
    assert list(rows) == ["style accuracy", "SSM to content", "SSIM luminance <=32px"]
    assert rows["SSM to content"][0] == "0.0000" and rows["SSIM luminance <=32px"][0] == "1.0000"  # identity
    assert any(line.strip().startswith("verdict: ") for line in quality)
    # The run's autoencoder decodes (SSIM is measured); its latents are not built-in: no crops to rebuild.
    assert "the autoencoder's reconstruction skipped: the latents are not builtin:textures" in out


def test_eval_takes_the_guidance_scale_asked_for(lgt_run, capsys, monkeypatch):
    """--eval --cfg S evaluates the transport guided at S (the run's lgt.cfg_scale by default)."""
    from engine.methods.lgt import LGT

    run, _, _ = lgt_run
    scales = []
    transfer = LGT.transfer
    monkeypatch.setattr(LGT, "transfer", lambda self, *a, **k: scales.append(self.cfg_scale) or transfer(self, *a, **k))
    for extra, expected in (([], 2.0), (["--cfg", "0.5"], 0.5)):
        scales.clear()
        assert main(["--checkpoint", str(run), "--eval", "--device", "cpu", *extra]) == 0
        assert capsys.readouterr().out.splitlines()[0].endswith(f"cfg {expected}")
        assert scales and set(scales) == {expected}


def test_unknown_style_is_refused_listing_the_valid_ones(lgt_run, tmp_path, capsys):
    run, images, _ = lgt_run
    assert main(["--checkpoint", str(run), "--content", str(images / "dots"), "--style", "brick",
                 "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 1
    error = capsys.readouterr().err
    assert "'brick'" in error and "0 dots, 1 stripes, 2 warm" in error
    assert not (tmp_path / "x.png").exists()


def test_a_run_that_is_not_lgt_is_refused(lgt_run, tmp_path, capsys):
    _, images, _ = lgt_run
    autoencoder_run = images.parent / "autoencoder"
    assert main(["--checkpoint", str(autoencoder_run), "--content", str(images / "dots"),
                 "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 1
    assert "trained with method.name = 'autoencoder'; this command needs 'lgt'" in capsys.readouterr().err


def test_a_missing_autoencoder_is_reported(lgt_run, tmp_path, capsys):
    run, images, _ = lgt_run
    assert main(["--checkpoint", str(run), "--content", str(images / "dots" / "1.png"), "--autoencoder",
                 str(tmp_path / "gone"), "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 1
    error = capsys.readouterr().err
    assert "the autoencoder that made these latents is missing" in error and str(tmp_path / "gone") in error
    assert "--autoencoder" in error


def test_eval_runs_on_the_device_asked_for_not_the_one_the_run_trained_on(lgt_run, tmp_path, capsys):
    """A run trained with train.device = 'cuda' is evaluated on a CPU-only machine with --device cpu."""
    run, _, _ = lgt_run
    checkpoint = ckpt.open_checkpoint(run)
    cfg = checkpoint.config()
    cfg.train.device = "cuda"
    gpu_run = tmp_path / "gpu-run"
    ckpt.save_checkpoint(gpu_run / "checkpoints", checkpoint.step, model_state=checkpoint.model_state(),
                         ema_state=checkpoint.model_state(ema=True), train_state=checkpoint.train_state(),
                         config=cfg, data_info=checkpoint.data_info(), keep=1)
    assert main(["--checkpoint", str(gpu_run), "--eval", "--device", "cpu", "--per-class", "1"]) == 0
    per_style, _ = evaluation_table(capsys.readouterr().out)
    assert [line.split()[0] for line in per_style[1:]] == list(STYLES)


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--cfg", "nan"], ["--per-class", "0"]])
def test_impossible_arguments_are_usage_errors(lgt_run, tmp_path, bad, capsys):
    run, images, _ = lgt_run
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(run), "--content", str(images / "dots"), "--out", str(tmp_path / "x.png"), *bad])
    assert exit_.value.code == 2 and "engine-transfer: error:" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_per_class_without_eval_is_a_usage_error(lgt_run, tmp_path, capsys):
    run, images, _ = lgt_run
    assert main(["--checkpoint", str(run), "--content", str(images / "dots"), "--per-class", "2"]) == 2
    assert "engine-transfer: error: --per-class only applies with --eval" in capsys.readouterr().err


def test_out_extension_picks_the_format_or_is_refused_before_any_work(tmp_path, capsys):
    """A .jpg name gets JPEG bytes, not PNG bytes under a .jpg name; an unknown extension is a usage
    error (exit 2) before the run is even opened."""
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    for name, expected in (("grid.jpg", "JPEG"), ("grid.JPEG", "JPEG"), ("grid.png", "PNG")):
        save_grid(images, tmp_path / name, nrow=2)
        with Image.open(tmp_path / name) as picture:
            assert picture.format == expected, name
    for command in (transfer_command, sample_command):
        with pytest.raises(SystemExit) as exit_info:
            command.main(["--checkpoint", str(tmp_path / "no-run"), "--content", "x.png", "--style", "all",
                          "--out", str(tmp_path / "grid.webp")] if command is transfer_command else
                         ["--checkpoint", str(tmp_path / "no-run"), "--out", str(tmp_path / "grid.webp")])
        assert exit_info.value.code == 2
        assert "unknown picture extension '.webp'" in capsys.readouterr().err
