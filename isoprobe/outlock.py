"""One run per output folder at a time: a lock file in the folder, holding the holder's pid and command.

Every command that writes an ``--out`` folder (``isoprobe repro``, ``gpt2``, ``inspect``) holds
it for the whole run (:func:`hold_folder`): ``OUT/.isoprobe.lock`` is created atomically
(``O_CREAT | O_EXCL``) with ``{"pid", "host", "command", "started"}`` and removed when the run
ends, however it ends (normal exit, an exception, Ctrl-C). A second run into the same folder
meanwhile raises :class:`FolderBusy` naming the holder. A lock left behind by a process that no
longer runs (killed, machine rebooted) is *stale*: it is taken over, and said so. A lock written
on another host cannot be checked from here and counts as held.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "FolderBusy", "hold_folder"]

LOCK_NAME = ".isoprobe.lock"


class FolderBusy(RuntimeError):
    """The output folder is held by another running isoprobe process (the message names it)."""


def _alive(pid: int) -> bool:
    """Does process ``pid`` run on this host (a process of another user counts as running)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict, path: Path) -> bool:
    """A lock is stale when its process, on this host, no longer runs, or when it is unreadable
    and older than a few seconds (a lock being written right now is not stale)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        try:
            return time.time() - path.stat().st_mtime > 5.0
        except FileNotFoundError:
            return False
    if holder.get("host") not in (None, socket.gethostname()):
        return False
    return not _alive(pid)


def _describe(holder: dict) -> str:
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {holder.get('pid')}{where}, started {holder.get('started', '?')}: {holder.get('command', '?')}"


def _take_over(path: Path, stale: dict) -> bool:
    """Move the stale lock ``stale`` out of the way, atomically: ``False`` if another process took
    it over first (the lock at ``path`` is then a live one, and is put back untouched)."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another process moved it first
        return False
    if _read_holder(aside) != stale:  # a fresh lock made since we read the stale one: not ours to take
        os.rename(aside, path)
        return False
    aside.unlink(missing_ok=True)
    return True


def _create(path: Path, content: str) -> bool:
    """Create ``path`` with ``content`` unless it exists (atomic); ``False`` if it does."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(content)
    return True


@contextlib.contextmanager
def hold_folder(folder: str | Path, command: str, notify: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for the block; yields the lock file's path.

    Raises :class:`FolderBusy` when a running process holds it, ``OSError`` when the folder
    cannot be written. A stale lock (its process is gone) is replaced, with a ``notify`` line.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    content = json.dumps(me) + "\n"
    for _attempt in range(3):  # a stale lock removed here may be re-created by a racing process
        if _create(path, content):
            break
        holder = _read_holder(path)
        if not _stale(holder, path):
            raise FolderBusy(
                f"{folder} is in use by another isoprobe run ({_describe(holder)}); wait for it to "
                f"finish or choose another --out (if that process is gone, remove {path})"
            )
        if _take_over(path, holder):
            notify(f"note: taking over the stale lock of {folder} (its process is gone: {_describe(holder)})")
    else:
        raise FolderBusy(f"{folder}: could not take its lock {path} (another run keeps taking it)")
    try:
        yield path
    finally:
        if _read_holder(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
