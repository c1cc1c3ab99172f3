"""Atomic, verifiable checkpoints: `run/checkpoints/step-N/` plus a `latest` pointer.

Writing. A checkpoint is written into a fresh temporary directory `.tmp-step-N-PID` (made with
os.mkdir, which fails on any existing entry, a planted symlink included), each file through
engine.safe_files (created exclusively, fsync'ed), then a manifest with each file's size and
SHA-256, and only then renamed to `step-N`. The `.tmp-step-*` leftovers of a killed process are
removed when the next save starts and are never loaded. A write that fails (a full disk above all)
removes the temporary directory at once and raises CheckpointError saying how much space a
checkpoint needs; the previous checkpoints are untouched, and `latest` is only ever moved to a
checkpoint that is complete and in place.

`latest` names the newest checkpoint written, for people and tools (`cat checkpoints/latest`). It
is replaced atomically and never written through a symlink, and loading never reads it: loading
takes the newest intact `step-N` directory, so a stale or planted `latest` cannot steer a resume.

Loading. verify() treats anything unexpected as damage, so a damaged checkpoint is skipped with a
warning in favour of the previous one and is never half-loaded: a manifest that is not UTF-8 JSON
of the shape below; a needed file it does not list, or a file in the directory it does not list; a
size or checksum that differs; a step that differs between the directory name, the manifest and
the train state; a train state that is not plain data. The checksums catch accidents, not intent
(whoever can plant a file can rewrite the manifest), so the train state is loaded with
`torch.load(weights_only=True)`: tensors, numbers, strings and containers load, and a pickle that
would run code is refused, never executed.

Layout of one checkpoint:
    model.safetensors   the method's state_dict (network weights and fixed buffers)
    ema.safetensors     the EMA copy's state_dict (absent when EMA is off)
    train_state.pt      optimizer, LR schedule, grad scaler, step, data position, RNG states
    config.toml         the resolved config of the run that wrote it
    data_info.json      sample shape and class names (and the prompt table's shape, prompts and encoder
                        for text conditioning), so samplers need not open the data
    manifest.json       {"step": N, "files": {name: {"bytes": n, "sha256": hex}}}
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.config import Config, ConfigError, load_config
from engine.safe_files import fsync_dir, replacing, write_text_atomic

MANIFEST = "manifest.json"
LATEST = "latest"
EMA_FILE = "ema.safetensors"
REQUIRED_FILES = frozenset({"model.safetensors", "train_state.pt", "config.toml", "data_info.json"})
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-step-"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected, or a checkpoint could not be written."""


MAX_KEYS_SHOWN = 8


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """module.load_state_dict(state) with nothing skipped: CheckpointError naming every missing,
    unexpected and shape-mismatched key (the first MAX_KEYS_SHOWN of each) when `state` (read from
    `where`) does not fit the module exactly, e.g. a model built from another config or prompt table
    than the one that saved the weights. Nothing is loaded then."""
    expected = module.state_dict()
    problems = []
    mismatched = [f"{key} {list(state[key].shape)} saved, {list(expected[key].shape)} in the model"
                  for key in sorted(expected.keys() & state.keys()) if state[key].shape != expected[key].shape]
    for what, keys in (("shapes differ", mismatched),
                       ("missing from the file", _by_block(expected.keys() - state.keys(), set(expected))),
                       ("not in the model", _by_block(state.keys() - expected.keys(), set(state)))):
        if keys:
            more = f", and {len(keys) - MAX_KEYS_SHOWN} more" if len(keys) > MAX_KEYS_SHOWN else ""
            problems.append(f"{what}: {'; '.join(keys[:MAX_KEYS_SHOWN])}{more}")
    if problems:
        raise CheckpointError(f"{where} does not fit the model built from its run's config ({' | '.join(problems)}); "
                              f"the weights were saved by another model (another [model] section, data shape, "
                              f"class list or prompt table): train into a new run.dir or point at the matching "
                              f"checkpoint")
    module.load_state_dict(state)


def _by_block(keys: set[str], everything: set[str]) -> list[str]:
    """`keys` (a subset of the state-dict keys `everything`) grouped by the largest module all of whose
    keys are in `keys`: 'model.prompts.* (2)' when a whole prompt table is missing, the key itself
    when its module has other keys."""
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        group = key
        for end in range(1, len(parts)):
            prefix = ".".join(parts[:end]) + "."
            if all(k in keys for k in everything if k.startswith(prefix)):
                group = prefix + "*"
                break
        groups[group] = groups.get(group, 0) + 1
    return [f"{group} ({count})" if group.endswith("*") else group for group, count in sorted(groups.items())]


class _Damaged(Exception):
    """What is wrong with a checkpoint; verify() returns it as text."""


@dataclass
class Checkpoint:
    path: Path
    step: int

    def weights_file(self, ema: bool = False) -> Path:
        """The weights file: ema.safetensors when `ema` and the run kept an EMA, else model.safetensors."""
        if ema and (self.path / EMA_FILE).exists():
            return self.path / EMA_FILE
        return self.path / "model.safetensors"  # trained without EMA: the raw weights are what there is

    def model_state(self, ema: bool = False) -> dict[str, torch.Tensor]:
        name = self.weights_file(ema).name
        try:
            return load_file(self.path / name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{self.path / name} cannot be read: {err}") from None

    def load_into(self, module: torch.nn.Module, ema: bool = False) -> None:
        """module.load_state_dict of this checkpoint's (EMA) weights, strictly: every key and shape must
        match (CheckpointError naming the keys otherwise, see `load_weights`)."""
        load_weights(module, self.model_state(ema), str(self.weights_file(ema)))

    def train_state(self) -> dict[str, Any]:
        try:
            return _load_train_state(self.path / "train_state.pt")
        except _Damaged as damage:
            raise CheckpointError(f"checkpoint {self.path}: {damage}") from None

    def config(self) -> Config:
        try:
            return load_config(self.path / "config.toml")
        except (ConfigError, OSError) as err:
            raise CheckpointError(f"{self.path / 'config.toml'} cannot be used: {err}") from None

    def data_info(self) -> dict[str, Any]:
        path = self.path / "data_info.json"
        try:
            info = json.loads(path.read_bytes())
        except (OSError, ValueError) as err:  # ValueError: not UTF-8 / not JSON
            raise CheckpointError(f"{path} cannot be read: {err}") from None
        if not (isinstance(info, dict) and isinstance(info.get("sample_shape"), list)
                and isinstance(info.get("class_names"), list)):
            raise CheckpointError(f"{path} does not hold the lists 'sample_shape' and 'class_names'")
        if "text" in info and not _is_text_record(info["text"], len(info["class_names"])):
            raise CheckpointError(f"{path}: its 'text' entry is not a prompt table record ({{'shape': [N, L, D] with "
                                  f"N = classes + 1, 'prompts': N strings, 'encoder': a string}})")
        return info


MAX_TEXT_RECORD_VALUES = 1 << 26  # a prompt table of 256 MB in fp32: far beyond any real one


def _is_text_record(text: Any, num_classes: int) -> bool:
    """A data_info.json "text" entry as engine.models.unet.text_conditioning_record writes it."""
    if not isinstance(text, dict):
        return False
    shape, prompts = text.get("shape"), text.get("prompts")
    return (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n for n in shape)
            and shape[0] * shape[1] * shape[2] <= MAX_TEXT_RECORD_VALUES
            and shape[0] == num_classes + 1 and isinstance(prompts, list) and len(prompts) == shape[0]
            and all(isinstance(p, str) for p in prompts) and isinstance(text.get("encoder"), str))


def _load_train_state(path: Path, mmap: bool = False) -> dict[str, Any]:
    """The train state, loaded as plain data only; _Damaged when it is anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # the weights-only unpickler refused a global or an opcode
        detail = re.search(r"WeightsUnpickler error: ([^\n]*?)(\. |\n|$)", str(err))
        raise _Damaged(f"{path.name} holds objects that are not plain data (possible code) and was not "
                       f"loaded ({detail.group(1) if detail else str(err).splitlines()[0]})") from None
    except Exception as err:  # noqa: BLE001 - a damaged zip / pickle raises a dozen types (zipfile, torch...)
        raise _Damaged(f"{path.name} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise _Damaged(f"{path.name} holds a {type(state).__name__}, not a dict")
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _host_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses non-contiguous tensors and tensors sharing storage: give each its own copy.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _nbytes(value: Any) -> int:
    """Bytes of the tensors in a nested dict / list: what a file holding `value` needs at least."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.1f} kB"


def _out_of_space(err: Exception) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    # safetensors reports the OS error in its text; torch.save's writer hides it behind its own
    # "[enforce fail at inline_container.cc] ... file write failed / unexpected pos" (a full disk).
    return ("No space left" in text or "os error 28" in text or "Disk quota exceeded" in text
            or (isinstance(err, RuntimeError) and "inline_container.cc" in text))


def _remove(path: Path) -> None:
    """Delete a file, a symlink (never what it points to) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _remove_leftovers(checkpoint_dir: Path) -> None:
    """The temporary directories of saves that never finished (their process was killed)."""
    for leftover in checkpoint_dir.glob(f"{_TMP_PREFIX}*"):
        try:
            _remove(leftover)
        except OSError:
            pass  # if one cannot go, the os.mkdir of this save's own name says so when it collides


def save_checkpoint(checkpoint_dir: Path, step: int, *, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor] | None, train_state: dict[str, Any],
                    config: Config, data_info: dict[str, Any], keep: int) -> Path:
    """Write `checkpoint_dir/step-{step}` atomically, point `latest` at it, keep the newest `keep`.

    A failed write (a full disk, an I/O error) removes its temporary directory at once and raises
    CheckpointError; the previous checkpoints are untouched, and `latest` only ever names a
    checkpoint that is complete and in place."""
    if train_state.get("step", step) != step:
        raise ValueError(f"train_state['step'] is {train_state['step']}, but this checkpoint is step {step}")
    model = _host_copy(model_state)
    ema = _host_copy(ema_state) if ema_state is not None else None
    sizes = {"model": _nbytes(model), **({"EMA": _nbytes(ema)} if ema is not None else {}),
             "train state": _nbytes(train_state)}  # known before writing: for the message if the disk is full
    final = checkpoint_dir / f"step-{step}"
    tmp = checkpoint_dir / f"{_TMP_PREFIX}{step}-{os.getpid()}"
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(checkpoint_dir)
        os.mkdir(tmp)  # fails on anything already there, a symlink included
        _write_files(tmp, step, model, ema, train_state, config, data_info)
        _move_into_place(tmp, final)
        write_text_atomic(checkpoint_dir / LATEST, final.name + "\n")
    except (OSError, SafetensorError, RuntimeError) as err:
        if _out_of_space(err):
            parts = ", ".join(f"{name} {_size(n)}" for name, n in sizes.items())
            raise CheckpointError(
                f"no space left on {checkpoint_dir}: a checkpoint needs ~{_size(sum(sizes.values()))} "
                f"({parts}); free space or set checkpoint.keep lower") from err
        if not isinstance(err, (OSError, SafetensorError)):
            raise  # not a failed write: a bug, shown as it is
        raise CheckpointError(f"cannot write a checkpoint in {checkpoint_dir}: {err}") from err
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    _remove_old(checkpoint_dir, keep)
    return final


def _write_files(directory: Path, step: int, model: dict[str, torch.Tensor],
                 ema: dict[str, torch.Tensor] | None, train_state: dict[str, Any], config: Config,
                 data_info: dict[str, Any]) -> None:
    """Every file of a checkpoint, the manifest last."""
    with replacing(directory / "model.safetensors") as part:
        save_file(model, part)
    if ema is not None:
        with replacing(directory / EMA_FILE) as part:
            save_file(ema, part)
    with replacing(directory / "train_state.pt") as part:
        torch.save(train_state, part)
    write_text_atomic(directory / "config.toml", config.to_toml())
    write_text_atomic(directory / "data_info.json", json.dumps(data_info))
    names = sorted(REQUIRED_FILES | ({EMA_FILE} if ema is not None else set()))
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
             for name in names}
    # No newline at the end: every byte of the manifest is then significant, so any truncation is damage.
    write_text_atomic(directory / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory to its final name. Whatever is there already (the
    same step saved again, e.g. stopped right after a periodic save; or a planted symlink) is
    renamed aside first, never written through, and deleted once the new checkpoint is in place."""
    aside = None
    if os.path.lexists(final):
        aside = tmp.with_name(tmp.name + "-replaced")
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        if aside is not None:
            os.rename(aside, final)
        raise
    try:
        fsync_dir(final.parent)
    finally:
        if aside is not None:
            _remove(aside)


def _step_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Every `step-N` directory, newest first. Temporary `.tmp-*` directories are not candidates, nor
    are symlinks (the engine never makes one: a symlink there was planted)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir() and not p.is_symlink()]
    return sorted(found, reverse=True)


def _remove_old(checkpoint_dir: Path, keep: int) -> None:
    """Keep the `keep` newest intact checkpoints and delete everything older. Damaged directories
    never count towards `keep` (they cannot be resumed from); those newer than the kept ones are
    left for inspection, and loading skips them."""
    intact = 0
    for _, path in _step_dirs(checkpoint_dir):  # newest first
        if intact < keep:
            intact += verify(path, checksums=False) is None
            continue
        shutil.rmtree(path, ignore_errors=True)


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the checkpoint at `path`, checked for shape and types; _Damaged if it is not
    exactly {"step": int, "files": {name: {"bytes": int, "sha256": hex}}} naming the needed files."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise _Damaged("no manifest.json (the write never finished)")
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise _Damaged("manifest.json is not valid UTF-8") from None
    except (ValueError, RecursionError) as err:  # RecursionError: nested too deep to be a manifest
        raise _Damaged(f"manifest.json is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or set(manifest) != {"step", "files"}:
        raise _Damaged('manifest.json does not hold exactly the keys "step" and "files"')
    step, files = manifest["step"], manifest["files"]
    if type(step) is not int or step < 0:
        raise _Damaged(f"manifest.json's step is {step!r}, not a whole number")
    if not isinstance(files, dict):
        raise _Damaged('manifest.json\'s "files" is not a table of files')
    if missing := REQUIRED_FILES - files.keys():
        raise _Damaged(f"manifest.json does not list {', '.join(sorted(missing))}")
    if unexpected := files.keys() - REQUIRED_FILES - {EMA_FILE}:
        raise _Damaged(f"manifest.json lists unexpected files: {', '.join(sorted(unexpected))}")
    for name, entry in files.items():
        if not _is_file_entry(entry):
            raise _Damaged(f'manifest.json\'s entry for {name} is not {{"bytes": size, "sha256": hex}}')
    return manifest


def _is_file_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and set(entry) == {"bytes", "sha256"}
            and type(entry["bytes"]) is int and entry["bytes"] >= 0
            and isinstance(entry["sha256"], str) and _SHA256_HEX.match(entry["sha256"]) is not None)


def _check(path: Path, checksums: bool) -> None:
    manifest = _read_manifest(path)
    step, files = manifest["step"], manifest["files"]
    named = _STEP_DIR.match(path.name)
    if named and int(named.group(1)) != step:
        raise _Damaged(f"manifest.json is for step {step}, but the directory is {path.name}")
    unlisted = sorted({entry.name for entry in os.scandir(path)} - files.keys() - {MANIFEST})
    if unlisted:
        raise _Damaged(f"{', '.join(unlisted)} not listed in manifest.json (unexpected file)")
    for name, expected in files.items():
        file = path / name
        if not os.path.lexists(file):
            raise _Damaged(f"{name} is missing")
        info = os.lstat(file)
        if not stat.S_ISREG(info.st_mode):
            raise _Damaged(f"{name} is not a regular file")
        if info.st_size != expected["bytes"]:
            raise _Damaged(f"{name} is {info.st_size} bytes, expected {expected['bytes']} (truncated?)")
        if checksums and _sha256(file) != expected["sha256"]:
            raise _Damaged(f"{name} does not match its checksum (corrupt)")
    if checksums:
        state = _load_train_state(path / "train_state.pt", mmap=True)  # mmap: tensors are not read
        if "step" in state and (type(state["step"]) is not int or state["step"] != step):
            raise _Damaged(f"train_state.pt is for step {state['step']!r}, but manifest.json for step {step}")


def verify(path: Path, checksums: bool = True) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else what is wrong with it. Never
    raises. `checksums=False` checks the manifest, presence and sizes only (cheap; used when
    rotating old checkpoints); the full check also loads the train state as plain data."""
    try:
        _check(Path(path), checksums)
    except _Damaged as damage:
        return str(damage)
    except OSError as err:
        return f"cannot be read ({err})"
    return None


def find_checkpoints(checkpoint_dir: Path) -> tuple[Checkpoint | None, int]:
    """The newest intact checkpoint (None if there is none) and how many step-N dirs exist at all.

    Damaged newer checkpoints are skipped with a warning naming what is wrong with each."""
    candidates = _step_dirs(checkpoint_dir)
    for step, path in candidates:
        problem = verify(path)
        if problem is None:
            return Checkpoint(path, step), len(candidates)
        warnings.warn(f"skipping damaged checkpoint {path}: {problem}; trying the previous one", stacklevel=2)
    return None, len(candidates)


def latest_checkpoint(checkpoint_dir: Path) -> Checkpoint | None:
    """The checkpoint to resume from; None for a fresh run; CheckpointError when checkpoints exist
    but none is intact (never silently start over on top of them)."""
    checkpoint, count = find_checkpoints(checkpoint_dir)
    if checkpoint is None and count > 0:
        raise CheckpointError(
            f"{checkpoint_dir} holds {count} checkpoint(s) but none is intact (see the warnings above). "
            f"Move them away to start a fresh run in this directory, or set --run.dir to a new one.")
    return checkpoint


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A run directory (its newest intact checkpoint) or one `step-N` checkpoint directory."""
    path = Path(path)
    named = _STEP_DIR.match(path.name)
    if (path / MANIFEST).is_file() or (named and path.is_dir() and not (path / "checkpoints").is_dir()):
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        step = int(named.group(1)) if named else _read_manifest(path)["step"]
        return Checkpoint(path, step)
    for checkpoint_dir in (path / "checkpoints", path):
        if checkpoint_dir.is_dir() and _step_dirs(checkpoint_dir):
            checkpoint = latest_checkpoint(checkpoint_dir)
            assert checkpoint is not None
            return checkpoint
    raise CheckpointError(f"no checkpoint found at {path}: pass a run directory (with checkpoints/) "
                          f"or a checkpoints/step-N directory")
