"""Write a directory atomically: readers see the old directory or the new one, never half.

``with atomic_directory(path, replaced=names) as tmp:`` yields a fresh directory beside `path`
holding the files of the old `path` except `replaced`; the caller writes the new files into
it (`fsync_file` each); on success it replaces `path` by rename, on any error it is deleted
and `path` is left as it was. A `path` that is a symlink stays one: the directory it points
to is replaced, beside itself.

A process killed mid-save (``kill -9``) leaves hidden directories beside `path`, named
``.<name>.<pid>.<random>.tmp`` (the new directory being written) or ``.old`` (the old one,
moved aside for the swap). `recover` (called by every save, and by loads) deletes those whose
process is gone, and where the kill came between the swap's two renames (`path` absent, the
old directory only in an ``.old``) first moves the old directory back. A saver's pid in the
name tells a crashed save from one under way in another process of this machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(path: Path, replaced: Collection[str]) -> Iterator[Path]:
    path = recover(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        # mkdtemp makes a private (0700) directory; the result gets the mode a plain mkdir gives.
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o777 & ~_umask())
        if path.exists():
            _carry_over(path, tmp, replaced)
        yield tmp
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover(path: Path) -> Path:
    """The directory `path` names (through a symlink), after cleaning up what saves to it that
    were killed left beside it; where one was killed between its two renames, the old directory
    is moved back to `path` first."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if not path.parent.is_dir():
        return path
    dead = []
    prefix = f".{path.name}."
    for entry in path.parent.iterdir():
        match = _LEFTOVER.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
        if match and not _alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):  # another process recovering the same path
                dead.append((entry.stat().st_mtime, entry, match["kind"]))
    for _, entry, kind in sorted(dead, reverse=True):  # the newest old directory first
        if kind == "old" and not path.exists() and (entry / path.name).is_dir():
            with contextlib.suppress(OSError):
                os.replace(entry / path.name, path)
    for _, entry, _ in dead:
        shutil.rmtree(entry, ignore_errors=True)
    return path


#: What follows ``.<name>.`` in a leftover's name (mkdtemp's random part has no dots).
_LEFTOVER = re.compile(r"(?P<pid>\d+)\.[^.]+\.(?P<kind>tmp|old)")


def _prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # another thread of this process may be saving
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fsync_file(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, tmp: Path, replaced: Collection[str]) -> None:
    # Files beside the adapter (a tokenizer, a README) survive the directory swap.
    for entry in old.iterdir():
        if entry.name in replaced:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), tmp / entry.name)
        else:
            _link_or_copy(str(entry), str(tmp / entry.name))


def _replace_dir(tmp: Path, path: Path) -> None:
    # POSIX cannot swap two directories in one rename: move the old one aside, move the new one
    # in, then delete the old. A crash in between leaves `path` absent and the old adapter in
    # the ".old" directory beside it, never a half-written `path`.
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".old", dir=path.parent))
    os.replace(path, old / path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old / path.name, path)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
