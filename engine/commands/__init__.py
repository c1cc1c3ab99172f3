"""The console scripts' shared layer: one argument style, one error format, one exit-code rule.

Every command (engine-train, engine-sample, engine-encode, engine-transfer) parses its arguments
with argparse and the argument types here, and runs its body through `run_command`, so they all
behave alike:

    exit 0    done
    exit 1    a run-time error: a file, checkpoint, data set or training problem
    exit 2    a usage error: bad arguments or config (argparse's own errors exit 2 too)
    exit 130  stopped by Ctrl+C / SIGTERM after saving; rerun the same command to resume

and every error is one line on stderr, `engine-X: error: ...`, naming the file / key / value at
fault, with no traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from engine.checkpoint import CheckpointError
from engine.filelock import LockHeld
from engine.options import ConfigError
from engine.pictures import picture_format
from engine.prepare import RunInterrupted
from engine.train import DataReadError, NonFiniteLossError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# What a command reports as one line (exit 1) instead of a traceback: problems with the user's
# files, data or training numbers. Anything else is a bug and keeps its traceback.
RUNTIME_ERRORS = (CheckpointError, NonFiniteLossError, DataReadError, LockHeld, OSError, ValueError, ImportError)


class UsageError(Exception):
    """Arguments that do not fit together (exit 2)."""


def run_command(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's body; map its outcome to the exit codes in the module doc."""
    try:
        return body() or EXIT_OK
    except (UsageError, ConfigError) as err:
        code, message = EXIT_USAGE, str(err)
    except RunInterrupted as err:
        code, message = EXIT_INTERRUPTED, str(err)
    except RUNTIME_ERRORS as err:
        code, message = EXIT_RUNTIME, str(err)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


# --------------------------------------------------------------------------- argument types


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def picture_path(text: str) -> str:
    """An output picture's path: .png, .jpg or .jpeg, refused before any work otherwise."""
    try:
        picture_format(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def device_name(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (this machine's GPU when there is one) | cpu | cuda[:N] (default auto)")

