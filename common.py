"""What every stage script shares: one-line input errors, finite-float flags, help text, result
JSON written atomically, repository-relative paths, and the allocator setting.

    from common import InputFileError, finite_float, write_json, portable_path

Nothing here knows about models or the paper; it imports only the standard library.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import tempfile
from pathlib import Path


class InputFileError(ValueError):
    """An input file that is missing or is not what it should be (reported as one line, exit code 2)."""


def finite_float(text: str) -> float:
    """argparse type for float flags: a number, and a finite one (inf or nan would train to NaN weights)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once, and only when there is one (the paper's value, where given, is the default)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "default" in (action.help or "") \
                or "paper:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def write_json(path, data) -> None:
    """JSON to a temp file, then os.replace: a reader never sees half a file."""
    path = Path(path)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def temp_prefix(path: Path) -> str:
    """.<name>.<pid>. : a temp file beside `path` that says which process writes it."""
    return f".{path.name}.{os.getpid()}."


def remove_stale_temps(path: Path) -> None:
    """Delete the temp files and directories a killed writer of `path` left (its process is gone)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2:].split(".")[0]
        if not pid.isdigit() or alive(int(pid)):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """Whether process pid still runs on this machine (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_number(v) -> bool:
    """An int or float read from JSON (a bool is not one)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


REPO = Path(__file__).resolve().parent


def portable_path(path) -> str:
    """A path as results JSON records it: relative to this repository (e.g. ../runs/ckpt/moe.pt), so a
    file committed under results/ names no machine's directories."""
    return os.path.relpath(Path(path).resolve(), REPO)


def portable_args(args, *paths: str) -> dict:
    """vars(args) as results JSON keeps them: the named path flags (a path or a list) made portable."""
    shown = {}
    for name in paths:
        value = getattr(args, name)
        if value:
            shown[name] = [portable_path(p) for p in value] if isinstance(value, list) else portable_path(value)
    return {**vars(args), **shown}


def unwritable(directory) -> str | None:
    """Why files cannot be written into `directory` (created if missing), or None if they can."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def tune_allocator() -> None:
    """Keep freed memory in the process (glibc): training re-allocates the same big buffers each
    step, and re-mapping them page-faults for 1.3-1.7x tokens/s. The limits are mallopt's largest
    (2 GiB): at 1 GiB, HF's reference step still gave its heap top back and re-faulted 1.5-2 GB a
    step (1.3 s -> 1.7-2.1 s, small preset). Scripts call it; import does not."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 2**31 - 1)        # M_TRIM_THRESHOLD: do not give the heap top back
    libc.mallopt(-3, 2**31 - 1)        # M_MMAP_THRESHOLD: serve large blocks from the heap

