"""engine-encode: an image folder -> one latents file, and its error paths."""

import numpy as np
import pytest
import torch
from PIL import Image

from engine import checkpoint as ckpt
from engine.autoencoders import load_autoencoder, weights_hash
from engine.commands.encode import main
from engine.config import load_config
from engine.data.latents import LatentSource, read_latents
from engine.encode import encode_folder
from engine.methods.autoencoder import AutoencoderMethod

TINY_KL = ["--method.name=autoencoder", "--autoencoder.channels=8", "--autoencoder.channel_mult=[1, 2]",
           "--autoencoder.num_groups=4"]



class Shape:
    sample_shape = (3, 16, 16)
    class_names = ("x",)


def save_autoencoder_run(run_dir, scaling_factor=0.0, poison=False):
    """A checkpoint of an (untrained) tiny f=2 autoencoder, laid out as engine-train writes it."""
    cfg = load_config(None, [*TINY_KL, f"--run.dir={run_dir}"])
    torch.manual_seed(0)
    method = AutoencoderMethod.from_config(cfg, Shape())
    method.autoencoder.scaling_factor.fill_(scaling_factor)
    if poison:
        method.autoencoder.encoder.conv_out.bias.data.fill_(float("nan"))
    state = method.state_dict()
    ckpt.save_checkpoint(run_dir / "checkpoints", 3, model_state=state, ema_state=state, train_state={},
                         config=cfg, data_info={"sample_shape": [3, 16, 16], "class_names": ["x"]}, keep=1)
    return run_dir


def write_png(path, seed, size=(16, 16), mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "styles"
    write_png(root / "brick" / "a.png", 0)
    write_png(root / "brick" / "b.png", 1, size=(24, 16))  # not square: centre-cropped
    write_png(root / "brick" / "deeper" / "c.png", 2, mode="L")  # grey, in a sub-folder
    write_png(root / "zebra" / "d.png", 3, size=(32, 32))  # larger: resized
    write_png(root / "zebra" / "e.png", 4)
    return root


def no_leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp") == []


def test_encode_then_load_round_trips_shapes_dtypes_labels_and_names(tmp_path, image_folder, capsys):
    run_dir = save_autoencoder_run(tmp_path / "ae")
    out = tmp_path / "out" / "latents.safetensors"
    assert main(["--images", str(image_folder), "--autoencoder", str(run_dir), "--out", str(out),
                 "--image-size", "16", "--batch-size", "2", "--device", "cpu"]) == 0
    assert "5 latents [4, 8, 8] fp16" in capsys.readouterr().out
    source = LatentSource.load(out, seed=0)
    assert source.latents.shape == (5, 4, 8, 8) and source.latents.dtype == torch.float16
    assert source.labels.tolist() == [0, 0, 0, 1, 1] and source.class_names == ["brick", "zebra"]
    assert source.sample_shape == (4, 8, 8)
    # No factor in the checkpoint: 1 / std of these latents, so what is stored has unit std.
    assert abs(source.latents.float().std().item() - 1.0) < 1e-2
    model, identity = load_autoencoder(run_dir)
    assert source.autoencoder == identity and identity.weights_hash == weights_hash(model)
    assert source.autoencoder.path == str(run_dir.resolve())
    # Stored latents are the posterior means times the factor.
    from engine.pictures import load_image

    mean = model.encode(load_image(image_folder / "zebra" / "e.png", 16)[None]).mode()
    torch.testing.assert_close(source.latents[4:5].float(), (mean * source.scaling_factor).half().float())
    assert no_leftovers(out.parent)


def test_fp32_sample_draws_and_the_autoencoders_own_scaling_factor(tmp_path, image_folder):
    run_dir = save_autoencoder_run(tmp_path / "ae", scaling_factor=0.5)
    kwargs = {"image_size": 16, "device": "cpu", "dtype": "fp32"}
    mean = encode_folder(image_folder, run_dir, tmp_path / "mean.safetensors", **kwargs)
    drawn = encode_folder(image_folder, run_dir, tmp_path / "a.safetensors", sample=True, seed=1, **kwargs)
    again = encode_folder(image_folder, run_dir, tmp_path / "b.safetensors", sample=True, seed=1, **kwargs)
    assert read_latents(tmp_path / "a.safetensors").latents.dtype == torch.float32
    assert mean.scaling_factor == 0.5 and mean.posterior == "mean" and drawn.posterior == "sample"
    assert torch.equal(drawn.latents, again.latents) and not torch.equal(drawn.latents, mean.latents)


def test_unreadable_image_is_an_error_naming_it_and_nothing_is_written(tmp_path, image_folder, capsys):
    (image_folder / "zebra" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    run_dir = save_autoencoder_run(tmp_path / "ae")
    out = tmp_path / "out" / "latents.safetensors"
    out.parent.mkdir()
    assert main(["--images", str(image_folder), "--autoencoder", str(run_dir), "--out", str(out),
                 "--image-size", "16", "--device", "cpu"]) == 1
    assert "broken.png" in capsys.readouterr().err
    assert not out.exists() and no_leftovers(out.parent)


def test_a_class_folder_without_images_is_an_error_naming_it(tmp_path, image_folder):
    (image_folder / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--images .*empty has no PNG/JPEG images"):
        encode_folder(image_folder, save_autoencoder_run(tmp_path / "ae"), tmp_path / "x.safetensors",
                      image_size=16, device="cpu")


def test_nan_latents_are_refused_naming_the_image(tmp_path, image_folder):
    run_dir = save_autoencoder_run(tmp_path / "ae", poison=True)
    out = tmp_path / "latents.safetensors"
    with pytest.raises(ValueError, match=r"NaN/inf latents .*brick/a\.png"):
        encode_folder(image_folder, run_dir, out, image_size=16, device="cpu")
    assert not out.exists() and no_leftovers(tmp_path)


def test_an_image_size_the_autoencoder_cannot_take_fails_before_encoding(tmp_path, image_folder):
    with pytest.raises(ValueError, match="divisible by 2"):
        encode_folder(image_folder, save_autoencoder_run(tmp_path / "ae"), tmp_path / "x.safetensors",
                      image_size=15, device="cpu")


def test_a_missing_autoencoder_is_a_clear_error(tmp_path, image_folder, capsys):
    assert main(["--images", str(image_folder), "--autoencoder", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "autoencoder not found" in capsys.readouterr().err


def test_sixteen_bit_images_encode_like_their_eight_bit_versions(tmp_path):
    levels = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    for name, pixels in (("eight", levels), ("sixteen", levels.astype(np.uint16) * 257)):
        (tmp_path / name / "grey").mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / name / "grey" / "a.png")
    run_dir = save_autoencoder_run(tmp_path / "ae", scaling_factor=0.5)
    kwargs = {"image_size": 16, "device": "cpu", "dtype": "fp32"}

    eight = encode_folder(tmp_path / "eight", run_dir, tmp_path / "eight.safetensors", **kwargs)
    sixteen = encode_folder(tmp_path / "sixteen", run_dir, tmp_path / "sixteen.safetensors", **kwargs)

    assert Image.open(tmp_path / "sixteen" / "grey" / "a.png").mode.startswith("I")
    assert torch.equal(sixteen.latents, eight.latents)  # not the all-white picture PIL's convert makes
