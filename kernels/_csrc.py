"""The csrc/ op library: found, built the first time, loaded.

`load()` runs once, when `kernels` is imported:

  1. LGT_CSRC=0 in the environment: nothing is loaded (the pure-PyTorch ops serve CPU tensors).
  2. LGT_CSRC_LIBRARY=PATH: that file is loaded (a build by hand: `cmake -S . -B build && cmake
     --build build`, then LGT_CSRC_LIBRARY=build/liblgt_csrc.so).
  3. Otherwise the library cached for these sources and this torch is loaded from
     $XDG_CACHE_HOME/lgt-engine/csrc/<key>/ (~/.cache/...); the first time, it is built there with
     CMake from the source checkout (about a minute on 2 cores), under a lock so that concurrent
     processes (torchrun ranks, parallel tests) build it once.

Any failure (no cmake or compiler, no csrc/ beside the package, a failed build) is said once per
process, with what to do, and leaves the library unloaded: `auto` then runs the PyTorch reference on
CPU tensors and `backend="csrc"` raises a ValueError that names the reason. A failed build is
remembered (build.log beside where the library would be) so that later processes do not retry it;
deleting that directory retries. (A CUDA build of torch needs the CUDA toolkit for torch's CMake
config even though the library has CPU ops only.)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

LIBRARY_NAME = "liblgt_csrc.so"
FAILED_LOG = "build.log"  # left where the library would be by a build that failed
# The ops kernels/ registers fake versions for and calls: a library without one of them is not used.
OPS = ("csrc_group_norm_film_silu", "csrc_group_norm_film_silu_fwd", "csrc_group_norm_film_silu_bwd",
       "csrc_patch_swd_fwd", "csrc_patch_swd_image_grad", "csrc_patch_swd_theta_grad")
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout holding CMakeLists.txt and csrc/

_loaded = False
_problem: str | None = "not loaded yet"


def loaded() -> bool:
    """Whether the library's ops are registered in this process."""
    return _loaded


def problem() -> str | None:
    """Why the library is not loaded, in words (None when it is)."""
    return _problem


def _sources() -> list[Path]:
    return [SOURCE_ROOT / "CMakeLists.txt", *sorted((SOURCE_ROOT / "csrc").glob("*.[ch]*"))]


def _cpu_flags() -> str:
    """The CPU's instruction-set flags: the library is compiled for them (-march=native), so a cache
    shared between different machines (an NFS home) keeps one build per kind of CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_key(sources: list[Path]) -> str:
    """Everything the built file depends on: the sources, the torch install (version, place, C++ ABI),
    the Python and the CPU."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(f"{torch.__version__} {torch.__file__} {torch._C._GLIBCXX_USE_CXX11_ABI} {sys.version_info[:2]} "
                  f"{platform.machine()} {_cpu_flags()}".encode())
    return digest.hexdigest()[:16]


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lgt-engine" / "csrc"


def _copy_into_place(source: Path, target: Path) -> None:
    """source's bytes at `target`, atomically: written under a fresh temporary name (O_EXCL, so never
    through a link planted there) and renamed, so other processes see the whole file or none."""
    descriptor, partial = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
    with os.fdopen(descriptor, "wb") as out, open(source, "rb") as data:
        shutil.copyfileobj(data, out)
    os.replace(partial, target)


def _build(target: Path) -> None:
    """Builds the library with CMake into `target` (atomically: a finished file or none)."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake is not installed (e.g. `apt install cmake g++` or `pip install cmake`)")
    target.parent.mkdir(parents=True, exist_ok=True)
    print("kernels: building the C++ op library (csrc/) for this torch, once; about a minute ...",
          file=sys.stderr, flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="build-") as build:
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        log = Path(build) / "build.log"
        steps = ([cmake, "-S", str(SOURCE_ROOT), "-B", build, *generator, "-DCMAKE_BUILD_TYPE=Release",
                  f"-DPython3_EXECUTABLE={sys.executable}"],
                 [cmake, "--build", build, "--parallel", str(os.cpu_count() or 1)])
        with log.open("w") as out:
            for step in steps:
                returncode = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
                if returncode < 0:  # killed by a signal (the OOM killer, Ctrl+C): not remembered
                    raise RuntimeError(f"the CMake build was killed by signal {-returncode}; the next import "
                                       f"tries again")
                if returncode > 0:
                    _copy_into_place(log, target.parent / FAILED_LOG)
                    tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
                    raise RuntimeError(f"the CMake build failed (log: {target.parent / FAILED_LOG}; delete "
                                       f"{target.parent} to retry):\n{tail}")
        _copy_into_place(Path(build) / LIBRARY_NAME, target)
    print(f"kernels: built {target} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def _built_library() -> Path:
    """The cached library for these sources and this torch, built first if it is not there."""
    sources = _sources()
    if not (SOURCE_ROOT / "csrc").is_dir() or not sources[0].is_file():
        raise RuntimeError(f"no csrc/ and CMakeLists.txt beside the package in {SOURCE_ROOT} (an install "
                           f"without the sources: `pip install -e .` from a checkout builds it)")
    target = _cache_root() / _cache_key(sources) / LIBRARY_NAME
    if target.is_file():
        return target
    if (target.parent / FAILED_LOG).is_file():
        raise RuntimeError(f"its build failed before (log: {target.parent / FAILED_LOG}; delete {target.parent} "
                           f"to retry)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW and no truncation: a link planted at the lock's name is refused, not written through.
    lock = os.open(target.parent / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then reuse its file
        if not target.is_file() and not (target.parent / FAILED_LOG).is_file():
            _build(target)
    finally:
        os.close(lock)
    if not target.is_file():
        raise RuntimeError(f"another process's build of it failed (log: {target.parent / FAILED_LOG})")
    return target


def load() -> bool:
    """Finds or builds the library and loads it (see the module docstring); True when loaded.
    Called once by `kernels._dispatch`; later calls return the first answer."""
    global _loaded, _problem
    if _problem != "not loaded yet":
        return _loaded
    if os.environ.get("LGT_CSRC", "1") == "0":
        _problem = "LGT_CSRC=0 is set"
        return False
    explicit = os.environ.get("LGT_CSRC_LIBRARY")
    try:
        path = Path(explicit) if explicit else _built_library()
        where = f"LGT_CSRC_LIBRARY={path}" if explicit else str(path)
        remedy = "build it again by hand" if explicit else f"delete {path.parent} to rebuild it"
        try:
            torch.ops.load_library(str(path))
        except OSError as error:
            raise RuntimeError(f"{where} does not load ({error}); {remedy}") from error
        missing = [name for name in OPS if not hasattr(torch.ops.lgt, name)]
        if missing:  # e.g. a build by hand from older sources
            raise RuntimeError(f"{where} lacks the ops {', '.join(missing)} (built from other sources); {remedy}")
    except (OSError, RuntimeError) as error:
        _problem = f"the csrc op library is not available: {error}"
        warnings.warn(f"kernels: {_problem}. CPU tensors use the PyTorch reference ops (set LGT_CSRC=0 to "
                      "skip this attempt).", stacklevel=2)
        return False
    _loaded, _problem = True, None
    return True
