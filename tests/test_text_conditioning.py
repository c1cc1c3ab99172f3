"""Text conditioning end to end, on a CPU in seconds: a DDPM trained on two very different classes
(bright pictures and dark ones), each named by a prompt of the offline encoder, samples what its
prompt asks for; and the same test, run with the cross-attention removed or the table's rows
swapped, fails. Also the seed's bugs as regression tests at the level of runs: a run's prompt table
travels in its checkpoint, and resuming with a model of another table is an error naming the keys."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.checkpoint import CheckpointError
from engine.commands import sample as sample_command
from engine.config import load_config
from engine.models.unet import CrossAttentionBlock, prompt_context_of
from engine.runs import load_run
from engine.train import train

# class -> mean pixel value in [-1, 1], in the image folder's (sorted) class order
CLASSES = {"coal_at_night": -0.75, "sunlit_snow": 0.75}
PROMPTS = ["a black heap of coal at night", "a bright white snowfield in full sun"]
SAMPLES = 8  # per prompt


def two_class_folder(root: Path) -> Path:
    """24 pictures per class, 8x8 RGB: noisy around the class's brightness."""
    rng = np.random.default_rng(0)
    for name, mean in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i in range(24):
            pixels = np.clip(mean + 0.15 * rng.standard_normal((8, 8, 3)), -1, 1)
            Image.fromarray(((pixels + 1) * 127.5).round().astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def text_config(run_dir: Path, images: Path, *extra: str):
    return load_config(None, [
        f"--run.dir={run_dir}", "--method.name=ddpm", f"--data.source=folder:{images}", "--data.image_size=8",
        "--data.num_workers=0", "--data.flip=false", "--text.encoder=wordllama", f"--text.prompts={PROMPTS}",
        "--model.channels=16", "--model.channel_mult=[1,2]", "--model.num_res_blocks=1",
        "--model.attention_resolutions=[4]", "--model.num_heads=2", "--model.num_groups=8",
        "--ddpm.timesteps=100", "--ddpm.prediction=v", "--ddpm.label_drop_prob=0.2", "--train.steps=150",
        "--train.batch_size=16", "--train.lr=2e-3", "--train.warmup_steps=10", "--train.ema_decay=0",
        "--train.device=cpu", "--sample.every=0", "--checkpoint.every=150", "--log.every=50",
        "--log.tensorboard=false", "--eval.at_end=false", *extra])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    run_dir = root / "run"
    train(text_config(run_dir, two_class_folder(root / "images")))
    return run_dir


def guided_brightness(method) -> torch.Tensor:
    """Mean pixel value of SAMPLES deterministic DDIM samples per prompt, guidance 3, the same SAMPLES
    noises for both prompts: [2, SAMPLES]."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(SAMPLES, *method.sample_shape, generator=generator)
    labels = torch.arange(2).repeat_interleave(SAMPLES)
    images = method.run_sampler(torch.cat([noise, noise]), generator, labels, sampler="ddim", steps=20,
                                cfg_scale=3.0)
    return images.mean(dim=(1, 2, 3)).view(2, SAMPLES)


def follows_prompts(method) -> bool:
    """Every sample is nearer (in mean brightness) to the class its prompt names than to the other."""
    brightness = guided_brightness(method)
    targets = torch.tensor(list(CLASSES.values()))
    nearest = (brightness[..., None] - targets).abs().argmin(dim=-1)  # [2, SAMPLES] class index
    return bool((nearest == torch.arange(2)[:, None]).all())


def test_samples_follow_their_prompt(trained_run):
    method = load_run(trained_run, "cpu").method
    assert follows_prompts(method)


def test_the_test_fails_without_cross_attention(trained_run, monkeypatch):
    """With every cross-attention block skipped, the two prompts give the same samples (same noise):
    the conditioning test cannot pass, so it tests the cross-attention path."""
    method = load_run(trained_run, "cpu").method
    monkeypatch.setattr(CrossAttentionBlock, "forward", lambda self, x, context, mask: x)
    brightness = guided_brightness(method)
    torch.testing.assert_close(brightness[0], brightness[1])
    assert not follows_prompts(method)


def test_the_test_fails_with_the_table_rows_swapped(trained_run):
    method = load_run(trained_run, "cpu").method
    prompts = prompt_context_of(method)
    with torch.no_grad():
        prompts.context[:2] = prompts.context[:2].flip(0).clone()
        prompts.mask[:2] = prompts.mask[:2].flip(0).clone()
    assert not follows_prompts(method)


def test_the_checkpoint_carries_the_prompt_table(trained_run):
    run = load_run(trained_run, "cpu")
    prompts = prompt_context_of(run.method)
    assert prompts.prompts == [*PROMPTS, ""] and prompts.encoder.startswith("wordllama:")
    assert run.data_info.text["shape"] == list(prompts.context.shape)
    assert prompts.mask[:, 0].all() and prompts.context.abs().sum() > 0  # the trained table, not zeros


def test_resuming_with_another_prompt_table_is_an_error_naming_the_keys(trained_run, tmp_path):
    """The seed resumed a checkpoint into a model whose cross-attention had other shapes and skipped the
    mismatched weights silently; here the resume stops and names the tables (the weights' keys are
    named by load_weights: tests/test_cross_attention.py)."""
    run_dir = tmp_path / "run"
    images = two_class_folder(tmp_path / "images")
    train(text_config(run_dir, images, "--train.steps=2", "--checkpoint.every=2"))
    with pytest.raises(CheckpointError, match=r"trained with the prompt table \[3, 16, 256\].*builds none"):
        train(text_config(run_dir, images, "--train.steps=4", "--text.encoder=", "--checkpoint.every=2"))


def test_engine_sample_draws_new_prompts(trained_run, tmp_path, capsys):
    out = tmp_path / "prompts.png"
    code = sample_command.main(["--checkpoint", str(trained_run), "--prompt", "a heap of black coal",
                                "--prompt", "snow in the sun", "--n", "4", "--steps", "5", "--cfg", "3",
                                "--device", "cpu", "--out", str(out)])
    assert code == 0 and Image.open(out).size[0] > 8


@pytest.mark.parametrize("args, code, message", [
    (["--prompt", "snow", "--labels", "0"], 2, "give one of them"),
    (["--prompt", "a", "--prompt", "b", "--prompt", "c"], 1, "3 prompts at once"),
])
def test_engine_sample_prompt_errors(trained_run, tmp_path, capsys, args, code, message):
    argv = ["--checkpoint", str(trained_run), "--n", "2", "--steps", "2", "--device", "cpu",
            "--out", str(tmp_path / "x.png"), *args]
    assert sample_command.main(argv) == code
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("method", ["fm", "fmm"])
def test_flow_methods_train_with_text(tmp_path, method):
    """fm and fmm take [text] too (fmm's jvp runs through the masked cross-attention written out)."""
    images = two_class_folder(tmp_path / "images")
    cfg = load_config(None, [
        f"--run.dir={tmp_path / 'run'}", f"--method.name={method}", f"--data.source=folder:{images}",
        "--data.image_size=8", "--data.num_workers=0", "--text.encoder=wordllama", "--model.channels=16",
        "--model.channel_mult=[1,2]", "--model.num_res_blocks=1", "--model.attention_resolutions=[4]",
        "--model.num_heads=2", "--model.num_groups=8", "--train.steps=2", "--train.batch_size=4",
        "--train.device=cpu", "--sample.every=2", "--sample.num=4", f"--{method}.sample_steps=2",
        "--log.tensorboard=false", "--eval.at_end=false"])
    train(cfg)
    method_run = load_run(tmp_path / "run", "cpu")
    assert prompt_context_of(method_run.method).prompts[-1] == ""
    assert (tmp_path / "run" / "samples" / "step-0000002.png").is_file()


def test_a_table_from_engine_embed_text_trains_and_must_match_the_classes(tmp_path):
    from engine.commands import embed_text

    images = two_class_folder(tmp_path / "images")
    table = tmp_path / "prompts.safetensors"
    assert embed_text.main(["--classes", ",".join(CLASSES), "--out", str(table)]) == 0
    train(text_config(tmp_path / "run", images, "--text.encoder=", f"--text.table={table}", "--text.prompts=[]",
                      "--train.steps=2"))
    assert prompt_context_of(load_run(tmp_path / "run", "cpu").method).prompts[0] == "a photo of coal at night"
    other = tmp_path / "other.safetensors"
    assert embed_text.main(["--classes", "cat,dog", "--out", str(other)]) == 0
    with pytest.raises(ValueError, match="made for the classes"):
        train(text_config(tmp_path / "run2", images, "--text.encoder=", f"--text.table={other}", "--train.steps=2"))


def test_resuming_with_other_prompts_of_the_same_shape_is_an_error(tmp_path):
    """Another template gives a table of the same shape, which would load without a shape error."""
    run_dir, images = tmp_path / "run", two_class_folder(tmp_path / "images")
    train(text_config(run_dir, images, "--train.steps=2", "--checkpoint.every=2"))
    other = ["a lump of coal", "sunny snow"]
    with pytest.raises(CheckpointError, match="resume with the \\[text\\] settings"):
        train(text_config(run_dir, images, "--train.steps=4", f"--text.prompts={other}"))


def test_text_without_attention_is_a_config_error(tmp_path):
    from engine.options import ConfigError

    with pytest.raises(ConfigError, match="model.attention_resolutions"):
        text_config(tmp_path / "run", tmp_path, "--model.attention_resolutions=[]")


def test_prompt_on_a_class_run_is_a_usage_error(tmp_path, capsys):
    run_dir, images = tmp_path / "run", two_class_folder(tmp_path / "images")
    train(text_config(run_dir, images, "--text.encoder=", "--text.prompts=[]", "--train.steps=1"))
    argv = ["--checkpoint", str(run_dir), "--prompt", "snow", "--n", "1", "--steps", "1", "--device", "cpu",
            "--out", str(tmp_path / "x.png")]
    assert sample_command.main(argv) == 2
    assert "trained without text conditioning" in capsys.readouterr().err
