"""Writing a bundle: never half-written, and nothing left behind by a killed export.

`staging(out, force)` yields a directory beside `out` named `.NAME.partial-PID`, with a marker
file naming the host and process that own it; it is renamed into place only when everything
inside was written, and removed on any error. An export killed outright (SIGKILL, power loss)
cannot clean up, so every export to `out` first removes the staging directories of `out`
whose owner is this host and no longer running (and leftovers of a replaced bundle).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmexport import LLMExportError

MARKER = ".llmexport-staging"


def check_out_dir(out: Path, force: bool) -> None:
    """`out` can be (re)placed: checked before any work, so minutes are not spent first."""
    if out.exists() and not out.is_dir():
        raise LLMExportError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LLMExportError(f"--out {out} exists and is not empty; pass --force to replace it")
    parent = out.resolve().parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise LLMExportError(f"--out {out}: {existing} is not a directory; choose another path")
    try:  # a file created (and removed) where the staging directory will go, or its nearest ancestor
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise LLMExportError(f"--out {out} cannot be written ({e.strerror or e}); choose a writable path") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _named_owner_gone(path: Path) -> bool:
    """The process whose id ends the directory's name (`.NAME.partial-PID`, `.NAME.old-PID`) is gone."""
    suffix = path.name.rsplit("-", 1)[-1]
    return suffix.isdigit() and not _alive(int(suffix))


def _stale(path: Path) -> bool:
    """A staging directory whose owner on this host is gone (or with no readable marker: one
    written before markers existed, or killed before writing it)."""
    try:
        host, pid = (path / MARKER).read_text().split("\n")[:2]
        return host == socket.gethostname() and not _alive(int(pid))
    except (OSError, ValueError):
        return _named_owner_gone(path)


def remove_stale(out: Path) -> list[Path]:
    """Remove the leftovers of killed exports to `out`; returns what was removed."""
    removed = []
    for path in out.parent.glob(f".{out.name}.partial-*"):
        if path.is_dir() and _stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in out.parent.glob(f".{out.name}.old-*"):
        if path.is_dir() and _named_owner_gone(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def staging(out: Path, force: bool) -> Iterator[Path]:
    out = out.resolve()
    check_out_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / MARKER).write_text(f"{socket.gethostname()}\n{os.getpid()}\n")
    try:
        yield tmp
        (tmp / MARKER).unlink()
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
