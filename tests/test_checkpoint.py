"""Checkpoints: atomic writes, verification, fallback past damaged ones, rotation."""

import hashlib
import json
import os
import warnings

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import Config


def save(directory, step, keep=3, value=None):
    state = {"w": torch.full((4, 3), float(step) if value is None else value)}
    return ckpt.save_checkpoint(directory, step, model_state=state, ema_state={"w": state["w"] * 2},
                                train_state={"step": step, "data_position": step * 2}, config=Config("lgt"),
                                data_info={"sample_shape": [3, 8, 8], "class_names": ["a"]}, keep=keep)


def test_round_trip_and_latest_pointer(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    found = ckpt.latest_checkpoint(tmp_path)
    assert found.step == 20
    assert (tmp_path / "latest").read_text().strip() == "step-20"
    assert torch.equal(found.model_state()["w"], torch.full((4, 3), 20.0))
    assert torch.equal(found.model_state(ema=True)["w"], torch.full((4, 3), 40.0))
    assert found.train_state()["data_position"] == 40
    assert found.config() == Config("lgt")


def test_saving_the_same_step_again_replaces_it_whole(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2, value=5.0)
    save(tmp_path, 2, value=7.0)  # e.g. stopped right after a periodic save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1", "step-2"]
    assert torch.equal(ckpt.latest_checkpoint(tmp_path).model_state()["w"], torch.full((4, 3), 7.0))


def test_rotation_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-4", "step-5"]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_manifest", "delete_file"])
def test_damaged_newest_is_skipped_with_a_warning(tmp_path, damage):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        target.unlink()
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        found = ckpt.latest_checkpoint(tmp_path)
    assert found.step == 1


def test_rotation_counts_only_intact_checkpoints(tmp_path):
    save(tmp_path, 100)
    save(tmp_path, 200)
    (save(tmp_path, 300) / "ema.safetensors").unlink()  # damaged: resume goes back to 200
    save(tmp_path, 250, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-250", "step-300"]
    with pytest.warns(UserWarning, match="step-300"):
        assert ckpt.latest_checkpoint(tmp_path).step == 250


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    only = save(tmp_path, 3)
    (only / "train_state.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ckpt.CheckpointError, match="none is intact"):
        ckpt.latest_checkpoint(tmp_path)


def test_half_written_temporary_directory_is_never_loaded(tmp_path):
    save(tmp_path, 1)
    (tmp_path / ".tmp-step-9-123").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).step == 1


def test_empty_directory_means_fresh_start(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") is None


def test_open_checkpoint_accepts_run_dir_or_step_dir(tmp_path):
    save(tmp_path / "checkpoints", 4)
    assert ckpt.open_checkpoint(tmp_path).step == 4
    assert ckpt.open_checkpoint(tmp_path / "checkpoints" / "step-4").step == 4
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint found"):
        ckpt.open_checkpoint(tmp_path / "elsewhere")


def rewrite_manifest(path, manifest=None):
    """Replace path/manifest.json with one recomputed from the files there (as someone planting a
    file would), or with `manifest` as given (a dict/list/str is dumped as JSON, bytes written raw)."""
    if manifest is None:
        manifest = {"step": int(path.name.split("-")[1]), "files": {
            p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for p in sorted(path.iterdir()) if p.name != "manifest.json"}}
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    (path / "manifest.json").write_bytes(data)


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("fp16_scaler", [True, False])
def test_a_real_train_state_round_trips_as_plain_data(tmp_path, fp16_scaler):
    """What engine.train writes (AdamW after a step, LambdaLR, GradScaler state or its empty dict,
    RNG state, ints) loads back whole through the weights-only loader and restores a TrainState."""
    from engine.ema import EMA
    from engine.train import TrainState, lr_lambda

    def make_state():
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01,
                                      fused=False)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(Config("lgt")))
        scaler = torch.amp.GradScaler("cpu", enabled=fp16_scaler)
        return model, TrainState(model, EMA(model, 0.999), optimizer, scheduler, scaler, world_size=1)

    model, state = make_state()
    state.scaler.scale(model(torch.randn(4, 3)).square().mean()).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.ema.update(model)
    state.step, state.data_position = 1, 2
    written = state.state_dict()
    assert bool(written["scaler"]) == fp16_scaler and written["optimizer"]["state"]
    ckpt.save_checkpoint(tmp_path, 1, model_state=model.state_dict(), ema_state=state.ema.state_dict(),
                         train_state=written, config=Config("lgt"),
                         data_info={"sample_shape": [3], "class_names": []}, keep=1)
    loaded = ckpt.latest_checkpoint(tmp_path).train_state()
    assert same(written, loaded)
    _, resumed = make_state()
    resumed.load_state_dict(loaded, "checkpoint")
    assert same(resumed.state_dict()["optimizer"], written["optimizer"])
    assert same(resumed.scaler.state_dict(), written["scaler"])
    assert (resumed.step, resumed.data_position, resumed.ema.num_updates) == (1, 2, 1)


class PlantedCode:
    """Pickles as a call to open(marker, "w"): unpickling it with weights_only=False creates the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_train_state_that_would_run_code_is_refused_and_resume_falls_back(tmp_path):
    save(tmp_path, 1)
    planted = save(tmp_path, 2)
    marker = tmp_path.parent / f"{tmp_path.name}-code-ran"
    torch.save({"step": 2, "data_position": 4, "payload": PlantedCode(marker)}, planted / "train_state.pt")
    rewrite_manifest(planted)  # the checksums match: only loading as plain data stops it

    problem = ckpt.verify(planted)
    assert "not plain data (possible code)" in problem and "was not loaded" in problem
    with pytest.warns(UserWarning, match=r"step-2: train_state.pt holds objects that are not plain data"):
        assert ckpt.latest_checkpoint(tmp_path).step == 1
    with pytest.raises(ckpt.CheckpointError, match="not plain data"):
        ckpt.open_checkpoint(planted)
    with pytest.raises(ckpt.CheckpointError, match="not plain data"):
        ckpt.Checkpoint(planted, 2).train_state()
    assert not marker.exists()


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _edit_manifest(edit):
    def damage(path):
        manifest = _manifest(path)
        rewrite_manifest(path, edit(manifest) or manifest)
    return damage


def _rename_key(entry, old, new):
    entry[new] = entry.pop(old)


def _rename_dir(path):
    path.rename(path.with_name("step-5"))  # its manifest and train state say step 2


def _planted_train_state_step(path):
    torch.save({"step": 9, "data_position": 0}, path / "train_state.pt")
    rewrite_manifest(path)


def _extra_file(path):
    (path / "notes.txt").write_text("not part of the checkpoint")


def _unlisted(name):
    def damage(path):
        rewrite_manifest(path)
        manifest = _manifest(path)
        del manifest["files"][name]
        rewrite_manifest(path, manifest)
    return damage


MANIFEST_DAMAGE = {
    "invalid_utf8": lambda p: rewrite_manifest(p, (p / "manifest.json").read_bytes().replace(b"e", b"\xe9")),
    "not_json": lambda p: rewrite_manifest(p, b"{\"step\": 2, \"files\": "),
    "files_empty_list": _edit_manifest(lambda m: m.update(files=[])),
    "files_empty_dict": _edit_manifest(lambda m: m.update(files={})),
    "renamed_files_key": _edit_manifest(lambda m: {"step": m["step"], "filez": m["files"]}),
    "renamed_step_key": _edit_manifest(lambda m: {"stop": m["step"], "files": m["files"]}),
    "renamed_bytes_key": _edit_manifest(lambda m: _rename_key(m["files"]["config.toml"], "bytes", "bytez")),
    "renamed_sha_key": _edit_manifest(lambda m: _rename_key(m["files"]["config.toml"], "sha256", "sha265")),
    "list_not_dict": lambda p: rewrite_manifest(p, [2, {}]),
    "string_not_dict": lambda p: rewrite_manifest(p, "step-2"),
    "null": lambda p: rewrite_manifest(p, b"null"),
    "entry_is_a_number": _edit_manifest(lambda m: m["files"].update({"model.safetensors": 5})),
    "bytes_is_a_string": _edit_manifest(lambda m: m["files"]["config.toml"].update(bytes="100")),
    "bytes_is_a_float": _edit_manifest(lambda m: m["files"]["config.toml"].update(
        bytes=float(m["files"]["config.toml"]["bytes"]))),
    "sha_is_a_number": _edit_manifest(lambda m: m["files"]["data_info.json"].update(sha256=12)),
    "step_is_a_string": _edit_manifest(lambda m: m.update(step="2")),
    "step_is_true": _edit_manifest(lambda m: m.update(step=True)),
    "step_differs_from_directory": _edit_manifest(lambda m: m.update(step=7)),
    "directory_differs_from_manifest": _rename_dir,
    "train_state_step_differs": _planted_train_state_step,
    "config_not_listed": _unlisted("config.toml"),
    "train_state_not_listed": _unlisted("train_state.pt"),
    "ema_present_but_not_listed": _unlisted("ema.safetensors"),
    "unexpected_file_in_directory": _extra_file,
    "unexpected_file_listed": lambda p: (_extra_file(p), rewrite_manifest(p)),
}


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_a_damaged_manifest_means_a_damaged_checkpoint(tmp_path, damage):
    """Unparsable, ill-typed or incomplete manifests, files it does not account for and steps that
    disagree: verify() says what is wrong, loading falls back with a warning, and opening that
    directory is a CheckpointError, never a traceback."""
    save(tmp_path, 1)
    MANIFEST_DAMAGE[damage](save(tmp_path, 2))
    newest = max(tmp_path.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    assert newest.name != "step-1"
    problem = ckpt.verify(newest)
    assert isinstance(problem, str) and problem
    with pytest.warns(UserWarning, match="skipping damaged checkpoint") as caught:
        assert ckpt.latest_checkpoint(tmp_path).step == 1
    assert len(caught) == 1 and problem in str(caught[0].message)
    with pytest.raises(ckpt.CheckpointError, match="is damaged"):
        ckpt.open_checkpoint(newest)


def test_a_bare_step_directory_is_a_checkpoint_error(tmp_path):
    (tmp_path / "step-3").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="step-3 is damaged: no manifest.json"):
        ckpt.open_checkpoint(tmp_path / "step-3")


def test_latest_is_a_pointer_that_loading_never_trusts(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    (tmp_path / "latest").write_text("step-1\n")
    assert ckpt.latest_checkpoint(tmp_path).step == 2
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").symlink_to(tmp_path / "step-1")
    assert ckpt.open_checkpoint(tmp_path).step == 2


def test_leftover_temporary_directories_are_removed_before_the_next_save_writes(tmp_path, monkeypatch):
    """A killed save leaves `.tmp-step-*` behind (on a full disk it holds the space the next save
    needs): the next save removes them before it writes anything, and loading never considers them."""
    save(tmp_path, 1)
    for leftover in (".tmp-step-9-123", f".tmp-step-2-{os.getpid()}", f".tmp-step-2-{os.getpid()}-replaced"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"\0" * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.latest_checkpoint(tmp_path).step == 1
    seen_at_first_write = []
    real_save_file = ckpt.save_file

    def save_file(tensors, path):
        seen_at_first_write.append(sorted(p.name for p in tmp_path.iterdir()))
        real_save_file(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    save(tmp_path, 2)
    assert [name for name in seen_at_first_write[0] if name.startswith(".tmp") and "-9-" in name] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1", "step-2"]
    assert ckpt.latest_checkpoint(tmp_path).step == 2


def test_config_and_data_info_errors_name_the_file(tmp_path):
    checkpoint = ckpt.latest_checkpoint(save(tmp_path, 1).parent)
    (checkpoint.path / "config.toml").write_text("[run\n")
    with pytest.raises(ckpt.CheckpointError, match="config.toml"):
        checkpoint.config()
    for content in (b"{not json", b'{"class_names": ["\xff"]}', b"[]", b'{"sample_shape": [3, 8, 8]}'):
        (checkpoint.path / "data_info.json").write_bytes(content)
        with pytest.raises(ckpt.CheckpointError, match="data_info.json"):
            checkpoint.data_info()
    (checkpoint.path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        checkpoint.model_state()


def test_a_train_state_for_another_step_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="train_state"):
        ckpt.save_checkpoint(tmp_path, 3, model_state={"w": torch.zeros(2)}, ema_state=None,
                             train_state={"step": 4}, config=Config("lgt"), data_info={}, keep=1)
    assert not any(tmp_path.iterdir())
