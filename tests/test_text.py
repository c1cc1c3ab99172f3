"""The offline text encoders, the prompt-table file and engine-embed-text."""

import importlib.util
import json
import socket
import string
import sys

import pytest
import torch
from safetensors.torch import save_file

from engine.commands.embed_text import main
from engine.text import (
    TABLE_FORMAT,
    PromptTable,
    build_prompt_table,
    check_encoder_matches,
    load_table_encoder,
    load_text_encoder,
    read_prompt_table,
    write_prompt_table,
)

BRICK_IDS = [1, 263, 15373, 310, 28645]  # "a photo of brick": BOS + 4 tokens


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder("wordllama")


@pytest.fixture(scope="module")
def table(encoder):
    return build_prompt_table(["brick", "grass_field"], encoder)


def no_leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp") == []


# --------------------------------------------------------------------------- the wordllama encoder


def test_wordllama_loads_and_encodes_with_the_network_refused(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    fresh = load_text_encoder.__wrapped__("wordllama")  # uncached: really load the files again
    context, mask = fresh.encode(["a photo of brick"])
    assert fresh.identity.startswith("wordllama:l2_supercat_256@") and len(fresh.identity.split("@")[1]) == 12
    assert fresh.dim == 256 and context.shape == (1, 8, 256) and mask.sum() == 5


def test_context_rows_are_the_token_embeddings_in_fp32(encoder):
    context, mask = encoder.encode(["a photo of brick"])
    assert context.dtype == torch.float32 and mask.dtype == torch.bool
    torch.testing.assert_close(context[0, :5], encoder.table[BRICK_IDS].float(), rtol=0, atol=0)


def test_encode_pads_to_a_multiple_of_8_with_zeros_and_false(encoder):
    prompts = ["a photo of brick", "", "a much longer prompt about moss, wet stones and grass in the sun"]
    context, mask = encoder.encode(prompts)
    lengths = [len(ids) for ids in encoder.tokenize(prompts)]
    assert context.shape == (3, mask.shape[1], 256) and mask.shape[1] % 8 == 0
    assert mask.shape[1] - 8 < max(lengths) <= mask.shape[1]
    assert mask.sum(dim=1).tolist() == lengths and lengths[1] == 1  # "" keeps its BOS token
    assert torch.equal(mask, torch.arange(mask.shape[1]) < torch.tensor(lengths)[:, None])  # prefixes
    assert (context[~mask] == 0).all() and (context[mask].abs().sum(dim=1) > 0).all()


def test_encode_is_deterministic_and_independent_of_the_batch(encoder):
    alone, _ = encoder.encode(["a photo of brick"])
    batch, _ = encoder.encode(["a photo of brick", "a photo of grass", "a photo of brick"])
    assert torch.equal(batch, encoder.encode(["a photo of brick", "a photo of grass", "a photo of brick"])[0])
    assert torch.equal(batch[0, :8], alone[0]) and torch.equal(batch[0], batch[2])
    assert not torch.equal(batch[0], batch[1])


def test_long_prompt_is_truncated_with_one_warning_naming_it(encoder):
    prompt = " ".join(["brick"] * 100)
    with pytest.warns(UserWarning, match="truncated") as caught:
        context, mask = encoder.encode([prompt, "short"])
    assert len(caught) == 1 and prompt in str(caught[0].message)
    assert context.shape[1] == 64 and mask.sum(dim=1).tolist()[0] == 64


def test_unknown_encoder_spec_lists_the_valid_ones():
    for spec in ("bert", "clip:", "wordllama:l2"):
        with pytest.raises(ValueError, match="'wordllama' or 'clip:DIR'"):
            load_text_encoder(spec)


def test_missing_wordllama_names_the_pip_command(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "wordllama" else real_find_spec(name, *args))
    with pytest.raises(ImportError, match=r"pip install -e '\.\[text\]'.*wordllama==0\.4\.0\.post1"):
        load_text_encoder.__wrapped__("wordllama")
    load_text_encoder.cache_clear()  # so the command below loads (and fails) rather than reuse the cached one
    assert main(["--classes", "brick", "--out", str(tmp_path / "t.safetensors")]) == 1
    assert "engine-embed-text: error:" in capsys.readouterr().err and not (tmp_path / "t.safetensors").exists()


# --------------------------------------------------------------------------- the CLIP encoder


def test_missing_clip_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_text_encoder.__wrapped__(f"clip:{tmp_path / 'nowhere'}")


def test_clip_without_transformers_names_the_pip_command(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match="pip install transformers"):
        load_text_encoder.__wrapped__(f"clip:{tmp_path}")


def save_tiny_clip(directory):
    """A random 1-layer CLIP text model (D = 16, 12 positions) and a letters-only tokenizer."""
    transformers = pytest.importorskip("transformers")
    tokens = ["<|startoftext|>", "<|endoftext|>", "<unk>", *string.ascii_lowercase,
              *(letter + "</w>" for letter in string.ascii_lowercase)]
    source = directory / "source"
    source.mkdir()
    (source / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (source / "merges.txt").write_text("#version: 0.2\n")
    config = transformers.CLIPTextConfig(vocab_size=len(tokens), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(directory / "clip")
    transformers.CLIPTokenizer.from_pretrained(source).save_pretrained(directory / "clip")
    return directory / "clip"


def test_clip_encoder_reads_a_local_directory(tmp_path):
    clip = load_text_encoder(f"clip:{save_tiny_clip(tmp_path)}")
    assert clip.identity.startswith(f"clip:{(tmp_path / 'clip').resolve()}@") and clip.dim == 16
    context, mask = clip.encode(["ab c", ""])
    assert context.shape == (2, 8, 16) and mask.sum(dim=1).tolist() == [5, 2]  # BOS ... EOS
    assert (context[~mask] == 0).all() and torch.isfinite(context).all()
    assert torch.allclose(clip.encode(["ab c"])[0][0], context[0], atol=1e-6)  # padding changes nothing
    with pytest.warns(UserWarning, match="truncated"):
        _, long_mask = clip.encode([" ".join(string.ascii_lowercase)])
    assert long_mask.sum() == 12 and clip.tokenize(["a"])[0][-1] == 1
    table = build_prompt_table(["a", "b"], clip, "{} c")
    write_prompt_table(tmp_path / "t.safetensors", table)
    assert load_table_encoder(read_prompt_table(tmp_path / "t.safetensors")).identity == clip.identity


# --------------------------------------------------------------------------- the table


def test_build_prompt_table_fills_the_template_and_ends_with_the_empty_prompt(table, encoder):
    assert table.prompts == ["a photo of brick", "a photo of grass field", ""]
    assert table.class_names == ["brick", "grass_field"] and table.encoder == encoder.identity
    assert table.shape == (3, 8, 256) and table.num_prompts == 2 and table.context_dim == 256
    assert torch.equal(table.context, encoder.encode(table.prompts)[0])
    given = build_prompt_table(["brick", "grass"], encoder, prompts=["red bricks", "green grass"])
    assert given.prompts == ["red bricks", "green grass", ""]


@pytest.mark.parametrize("kwargs, match", [
    ({"template": "a photo"}, "has no {}"),
    ({"template": "a {} of {}"}, "use {} once"),
    ({"prompts": ["only one"]}, "1 prompts for 2 classes"),
    ({"prompts": ["red bricks", " "]}, "is empty"),
])
def test_build_prompt_table_refuses_bad_templates_and_prompt_counts(encoder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_prompt_table(["brick", "grass"], encoder, **kwargs)
    with pytest.raises(ValueError, match="at least one class"):
        build_prompt_table([], encoder)


def test_table_round_trips_and_is_written_atomically(table, tmp_path):
    path = tmp_path / "t.safetensors"
    write_prompt_table(path, table)
    write_prompt_table(path, table)  # replaces the file it wrote
    back = read_prompt_table(path)
    assert torch.equal(back.context, table.context) and torch.equal(back.mask, table.mask)
    assert (back.prompts, back.class_names, back.encoder) == (table.prompts, table.class_names, table.encoder)
    assert no_leftovers(tmp_path) and [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_write_refuses_a_table_that_read_would_refuse(table, tmp_path):
    bad = PromptTable(table.context.clone(), table.mask, table.prompts, table.encoder, table.class_names)
    bad.context[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        write_prompt_table(tmp_path / "t.safetensors", bad)
    assert list(tmp_path.iterdir()) == []


def test_missing_table_says_to_run_engine_embed_text(tmp_path):
    with pytest.raises(FileNotFoundError, match="engine-embed-text"):
        read_prompt_table(tmp_path / "absent.safetensors")


def save_raw(path, table, context=None, mask=None, **metadata):
    """A table file written without write_prompt_table's checks; metadata=None drops a key."""
    fields = {"format": TABLE_FORMAT, "prompts": json.dumps(table.prompts),
              "class_names": json.dumps(table.class_names), "encoder": table.encoder, **metadata}
    save_file({"context": table.context if context is None else context, "mask": table.mask if mask is None else mask},
              str(path), metadata={key: value for key, value in fields.items() if value is not None})


def nan_context(table):
    context = table.context.clone()
    context[0, 0, 0] = float("nan")
    return context


def false_row(table):
    mask = table.mask.clone()
    mask[2] = False
    return mask


DAMAGES = {
    "truncated": lambda path, table: path.write_bytes(path.read_bytes()[:-100]),
    "header bytes flipped": lambda path, table: path.write_bytes(
        path.read_bytes()[:8] + b"#" * 12 + path.read_bytes()[20:]),
    "wrong format": lambda path, table: save_raw(path, table, format="engine-latents/1"),
    "NaN in context": lambda path, table: save_raw(path, table, context=nan_context(table)),
    "all-False mask row": lambda path, table: save_raw(path, table, mask=false_row(table)),
    "uint8 mask": lambda path, table: save_raw(path, table, mask=table.mask.to(torch.uint8)),
    "no encoder": lambda path, table: save_raw(path, table, encoder=None),
    "prompts not JSON": lambda path, table: save_raw(path, table, prompts="[brick"),
    "prompts not strings": lambda path, table: save_raw(path, table, prompts="[1, 2, 3]"),
    "last prompt not empty": lambda path, table: save_raw(path, table, prompts='["a", "b", "c"]'),
    "too few prompts": lambda path, table: save_raw(path, table, prompts='["a", ""]'),
    "too many class names": lambda path, table: save_raw(path, table, class_names='["a", "b", "c"]'),
    "context 2-D": lambda path, table: save_raw(path, table, context=table.context[:, :, 0].contiguous()),
    "mask shape": lambda path, table: save_raw(path, table, mask=table.mask[:, :4].contiguous()),
    "zero-width context": lambda path, table: save_raw(path, table, context=table.context[:, :, :0].contiguous()),
    "deeply nested prompts": lambda path, table: save_raw(path, table, prompts="[" * 100000 + "]" * 100000),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_damaged_table_file_is_a_value_error_naming_it(table, tmp_path, damage):
    path = tmp_path / "t.safetensors"
    write_prompt_table(path, table)
    DAMAGES[damage](path, table)
    with pytest.raises(ValueError, match=f"{path}.*engine-embed-text"):
        read_prompt_table(path)


def test_a_new_prompt_needs_the_tables_encoder(table, encoder):
    assert load_table_encoder(table).identity == encoder.identity
    check_encoder_matches(table, encoder)
    other = PromptTable(table.context, table.mask, table.prompts, "wordllama:l2_supercat_256@000000000000",
                        table.class_names)
    with pytest.raises(ValueError, match=f"{encoder.identity}.*wordllama:l2_supercat_256@000000000000"):
        check_encoder_matches(other, encoder)
    with pytest.raises(ValueError, match="same weights"):
        load_table_encoder(other)


# --------------------------------------------------------------------------- engine-embed-text


def test_cli_writes_the_table_and_prints_its_shape(tmp_path, capsys, encoder):
    out = tmp_path / "table.safetensors"
    assert main(["--classes", "brick,grass_field", "--template", "{} texture", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[3, 8, 256]" in printed and encoder.identity in printed
    assert read_prompt_table(out).prompts == ["brick texture", "grass field texture", ""]


def test_cli_reads_one_prompt_per_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red bricks in a wall\n\ngreen grass\n")
    assert main(["--prompts", str(prompts), "--classes", "brick,grass", "--out", str(tmp_path / "a.st")]) == 0
    table = read_prompt_table(tmp_path / "a.st")
    assert table.prompts == ["red bricks in a wall", "green grass", ""] and table.class_names == ["brick", "grass"]
    assert main(["--prompts", str(prompts), "--out", str(tmp_path / "b.st")]) == 0
    assert read_prompt_table(tmp_path / "b.st").class_names == ["red bricks in a wall", "green grass"]


@pytest.mark.parametrize("argv, code", [
    (["--out", "t.st"], 2),
    (["--prompts", "p.txt", "--template", "{}", "--out", "t.st"], 2),
    (["--prompts", "p.txt", "--classes", "a,b,c", "--out", "t.st"], 1),
    (["--prompts", "absent.txt", "--out", "t.st"], 1),
])
def test_cli_bad_arguments_are_one_error_line(tmp_path, monkeypatch, capsys, argv, code):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("red bricks\ngreen grass\n")
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("engine-embed-text: error:") and err.count("\n") == 1
    assert not (tmp_path / "t.st").exists()


@pytest.mark.parametrize("argv", [[], ["--classes", "a,,b", "--out", "t.st"], ["--encoder", "bert", "--out", "t.st"]])
def test_cli_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "engine-embed-text: error:" in capsys.readouterr().err
