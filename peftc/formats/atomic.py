"""Atomic writes: write into a temporary sibling, move into place only once complete.

Every file peftc writes (an adapter checkpoint, an export, the CLI's ``merge
--out``) goes through here, so a failure at any point (an exception, a full
disk, ``KeyboardInterrupt``) leaves the previous artifact at that path intact
and no partial files:

- :func:`write_temporary` writes one file into a hidden sibling of its target;
- :func:`replace_all` moves a set of such files over their targets, all or
  nothing (each old file is kept as a backup until every move has landed);
- :func:`staged` is the same for a whole artifact (a file, a few files, or a
  folder): the caller writes and checks it in a hidden sibling folder, and it
  is published only when the ``with`` block ends without an exception;
- :func:`check_space` fails before a write that would fill the disk.

(A crash of the process itself between two renames can still leave a mix; an
exception can't.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import PeftcError

__all__ = ["check_space", "make_folders", "remove_folders", "replace_all", "staged", "write_temporary"]


def make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, outermost first.

    Raises:
        PeftcError: a folder that can't be created (none of the others is left behind).
    """
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    made: list[Path] = []
    for path in missing:
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            remove_folders(made)
            raise PeftcError(f"can't create the folder {path}: {e}") from e
        made.append(path)
    return made


def remove_folders(made: list[Path]) -> None:
    """Remove the folders :func:`make_folders` created, innermost first, where they are empty."""
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            folder.rmdir()


def write_temporary(target: Path, write: Callable[[str], object]) -> Path:
    """``write(path)`` into a new hidden sibling of ``target``; its path once complete.

    Raises:
        PeftcError: ``target``'s folder refuses new files (read-only, say).
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise PeftcError(f"can't write into {target.parent}: {e}") from e
    os.close(fd)
    try:
        write(tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def replace_all(staged: Iterable[tuple[Path | None, Path]]) -> None:
    """Move every temporary file over its target (``None``: remove the target); if one move
    fails, put every old file back.

    Each existing target is first hard-linked (or copied) to a backup, so it stays in
    place until its replacement lands and can be restored if a later move fails.
    """
    backups: list[Path] = []
    done: list[tuple[Path | None, Path]] = []
    try:
        for tmp, target in staged:
            backup = _backup(target) if target.exists() else None
            if backup is not None:
                backups.append(backup)
            if tmp is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(tmp, target)
            done.append((backup, target))
    except BaseException:
        for backup, target in reversed(done):
            if backup is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(backup, target)
        raise
    finally:
        for backup in backups:
            backup.unlink(missing_ok=True)


@contextlib.contextmanager
def staged(target: str | os.PathLike, stale: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Write an artifact into a hidden sibling of ``target``; publish it at ``target`` on success.

    Yields a path named like ``target`` inside a new hidden folder next to it: write
    the artifact there (a file, files beside it such as ONNX's external data, or a
    folder) and check it. When the block ends without an exception, each file written
    replaces its namesake next to ``target`` (inside ``target`` for a folder), all or
    nothing; a folder that didn't exist is moved into place whole. On any exception
    nothing at ``target`` changes, and the hidden folder and the parent folders it
    needed are removed.

    Arguments:
        target: the artifact's final path.
        stale: for a folder artifact written over an old one: which of the old
            folder's files to remove with the swap (old weight shards the new
            artifact doesn't have, say). Default: none.
    """
    target = Path(target)
    made = make_folders(target.parent)
    try:
        stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    except OSError as e:
        remove_folders(made)
        raise PeftcError(f"can't write into {target.parent}: {e}") from e
    try:
        yield stage / target.name
        _publish(stage, target, stale)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        remove_folders(made)
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: Path, target: Path, stale: Callable[[Path], bool] | None) -> None:
    written = stage / target.name
    if not written.exists():
        raise PeftcError(f"nothing was written for {target}")
    if written.is_dir() and not target.exists():
        os.replace(written, target)  # a new folder: one rename
        return
    if written.is_dir():
        if not target.is_dir():
            raise PeftcError(f"{target} is a file; a folder goes there")
        source, into = written, target
    else:
        source, into = stage, target.parent
    entries = sorted(source.iterdir())
    for entry in entries:
        if entry.is_dir():
            raise PeftcError(f"the artifact for {target} holds a folder, {entry.name}; peftc publishes files only")
    moves: list[tuple[Path | None, Path]] = [(entry, into / entry.name) for entry in entries]
    names = {entry.name for entry in entries}
    if written.is_dir() and stale is not None:
        moves += [(None, old) for old in sorted(target.iterdir())
                  if old.is_file() and old.name not in names and stale(old)]
    replace_all(moves)


def check_space(folder: Path, needed: int, what: str) -> None:
    """Raise unless ``folder``'s file system has ``needed`` bytes free.

    Raises:
        PeftcError: naming the space needed and the space available.
    """
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise PeftcError(f"not enough disk space to write {what}: it needs about {_size(needed)}, "
                         f"{folder} has {_size(free)} free. Free some space or write elsewhere")


def _size(n: float) -> str:
    """``n`` bytes for a person: ``512 B``, ``3.2 MiB``."""
    units = ["B", "KiB", "MiB", "GiB"]
    while n >= 1024 and len(units) > 1:
        n /= 1024
        units.pop(0)
    return f"{n:.0f} B" if units[0] == "B" else f"{n:.1f} {units[0]}"


def _backup(target: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old")
    os.close(fd)
    backup = Path(name)
    backup.unlink()
    try:
        os.link(target, backup)
    except OSError:  # no hard links on this file system: a copy does too
        try:
            shutil.copy2(target, backup)
        except BaseException:
            backup.unlink(missing_ok=True)
            raise
    return backup
