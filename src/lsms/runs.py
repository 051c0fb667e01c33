"""Run folders: what keeps a typo, a second training or a crash from spoiling a run (docs/reliability.md).

- :func:`check_run_folder`: a new training refuses a folder that already holds a run, unless it resumes that
  run or is told to ``--overwrite`` it; called before any work.
- :class:`RunLock`: ``RUN/.lock`` names the process training into the folder; a second one is refused while
  it lives, and a lock left by a dead process (same machine) is taken over.
- :func:`remove_orphans`: temporary files a kill left half-written (``.last.pt.*.tmp``, ``metrics.csv.tmp``)
  are removed when the next training of that folder starts, under its lock.
- :func:`writable_folder`: an output folder is created (or found not to be creatable) before any work.
- :func:`resume_settings`: a resumed run continues with its saved settings; settings given again override
  them, and say so.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from lsms.config import set_path
from lsms.settings import plain

log = logging.getLogger(__name__)

RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "log.jsonl", "config.json", "summary.json")  # what makes a run
RUN_FOLDERS = ("tensorboard",)
LOCK_NAME = ".lock"
_YOUNG_LOCK_S = 30.0  # an unreadable lock younger than this may be one being written: respected


class RunInUseError(RuntimeError):
    """Another live process holds the run folder's lock."""


def writable_folder(folder: Path, what: str) -> None:
    """Create ``folder`` (an output location) now, before any work, or say why it cannot be."""
    try:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{what} {folder}: exists and is not a folder; give a folder path")
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a name too long, a read-only parent, a dangling link, ...
        raise ValueError(f"{what} {folder}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {folder}: the folder is not writable")


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it and ``os.replace``: a reader never sees half a
    file, and a crash leaves the previous one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_files(folder: Path) -> list[str]:
    """The names of a run's files and folders present in ``folder``."""
    return [n for n in (*RUN_FILES, *RUN_FOLDERS) if (folder / n).exists()]


def check_run_folder(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds one (unless ``resume`` or ``overwrite``).

    Raises:
        ValueError: ``folder`` is a file, or holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    try:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out {folder}: exists and is not a folder; give a folder path")
        found = run_files(folder) if folder.is_dir() else []
    except OSError as err:
        raise ValueError(f"--out {folder}: unusable as a folder ({err.strerror or err})") from None
    if found and not resume and not overwrite:
        raise ValueError(
            f"--out {folder}: already holds a run ({', '.join(found)}); continue it with --resume {folder}, start it "
            "over with --overwrite (deletes its checkpoints and logs), or choose another --out"
        )


def remove_orphans(folder: Path) -> list[Path]:
    """Delete the temporary files (``*.tmp``) atomic writes leave when a process is killed mid-write.

    Call it only while holding the folder's :class:`RunLock`, so no live writer's file is taken.
    """
    removed = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted save in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed))
    return removed


class RunLock:
    """``RUN/.lock`` holding the pid, host and start time of the process training into ``RUN``.

    Taken with ``O_CREAT | O_EXCL`` (atomic); released on exit. A lock whose process is gone (same host, no
    such pid) is stale and taken over with a warning; one from another host is respected, as its process
    cannot be checked from here.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or self._alive(holder):
                    who = "another process" if holder is None else (
                        f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')})")
                    raise RunInUseError(
                        f"{self.folder}: {who} is training into this run folder; wait for it to finish, choose "
                        f"another --out, or delete {self.path} if that process is gone"
                    ) from None
                log.warning("%s: taking over a stale lock (process %s on %s is gone)", self.folder,
                            holder.get("pid"), holder.get("host"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunInUseError(f"{self.folder}: could not take {self.path}; another process keeps creating it")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict[str, Any] | None:
        """The lock's content; {} for an unreadable one old enough to be stale; None when it is young."""
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                return holder
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            pass
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return {}
        return {} if age > _YOUNG_LOCK_S else None

    @staticmethod
    def _alive(holder: dict[str, Any]) -> bool:
        if not holder:
            return False
        if holder.get("host") != socket.gethostname():
            return True  # cannot look at another machine's processes
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


@contextlib.contextmanager
def run_folder(folder: Path, resume: bool, overwrite: bool, enabled: bool = True) -> Iterator[None]:
    """Hold ``folder`` for one training: checked, created, locked, cleared (``overwrite``), orphans removed.

    Args:
        folder: the run folder (``--out``).
        resume: this training continues the run in ``folder``.
        overwrite: start over in a folder that holds a run, deleting its checkpoints and logs.
        enabled: False on the non-main processes of a distributed run (only rank 0 writes the folder).
    """
    if not enabled:
        yield
        return
    check_run_folder(folder, resume, overwrite)
    writable_folder(folder, "--out")
    with RunLock(folder):
        if overwrite and not resume:
            for name in run_files(folder):
                path = folder / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            log.info("--overwrite: removed the previous run's files in %s", folder)
        remove_orphans(folder)
        yield


def resume_settings(saved: dict[str, Any], given: dict[str, Any], fixed: Collection[str],
                    strict: bool = True) -> dict[str, Any]:
    """The settings a resumed run continues with: the ``saved`` tree, with each setting of the ``given`` tree (the
    ones the user set again) overriding it, logged. A ``fixed`` setting (a path such as ``model`` or
    ``data.image_size``, which the checkpoint's model or preprocessing embodies) cannot change: with ``strict``
    an error says so, otherwise it keeps its saved value."""
    merged = copy.deepcopy(saved)
    for path, value in _leaves(given):
        before = _get(saved, path)
        if plain(value) == plain(before):
            continue
        if any(path == f or path.startswith(f + ".") for f in fixed):
            if strict:
                raise ValueError(f"--resume: {path} is {before!r} in the saved run and cannot change to {value!r} (the "
                                 "model and its preprocessing come from the checkpoint); drop the setting or start a new run")
            continue
        log.info("resume: %s = %r overrides the saved %r", path, value, before)
        set_path(merged, path, value)
    return merged


def changed_settings(tree: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The part of a settings ``tree`` that differs from ``defaults`` (a tree again)."""
    out: dict[str, Any] = {}
    for path, value in _leaves(tree):
        if plain(value) != plain(_get(defaults, path)):
            set_path(out, path, value)
    return out


def _leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every non-mapping value of a nested settings dict."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _get(tree: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree
