"""Every path a user names, checked before work starts: it exists, is a directory, is writable, loses nothing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class PathError(ValueError):
    """A path that cannot be used as asked (missing, a file for a directory, read-only); one-line message."""


def existing_dir(path: str | Path, what: str, error: type[Exception] = PathError) -> Path:
    """A directory to read from. ``error``: the caller's own user-error type, so its callers' handlers still apply."""
    p = Path(path).expanduser()
    if not p.exists():
        raise error(f"{what} {p} does not exist")
    if not p.is_dir():
        raise error(f"{what} {p} is {_kind(p)}, not a directory")
    return p


def existing_file(path: str | Path, what: str, error: type[Exception] = PathError) -> Path:
    """A file to read from (not a directory)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise error(f"{what} {p} does not exist")
    if p.is_dir():
        raise error(f"{what} {p} is a directory, not a file")
    return p


def writable_dir(path: str | Path, what: str, error: type[Exception] = PathError) -> Path:
    """A directory this command will write into: one that exists and takes a new file, or one it can create
    (its nearest existing ancestor takes one). Leaves nothing behind: a later mistake leaves no empty directory."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise error(f"{what} {p} is {_kind(p)}, not a directory")
        _probe(p, f"{what} {p} is not writable", error)
        return p
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise error(f"{what} {p} cannot be created: {ancestor} is {_kind(ancestor)}, not a directory")
    _probe(ancestor, f"{what} {p} cannot be created in {ancestor}", error)
    return p


def output_file(path: str | Path, what: str, replace: bool = False, hint: str = "", make_parents: bool = False,
                error: type[Exception] = PathError) -> Path:
    """A file this command will write: not a directory, in a writable directory that exists (or, with
    ``make_parents``, that it can create), and not a file that is already there unless ``replace`` (a slip of -o
    onto a key would otherwise lose it for good)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise error(f"{what} {p} is a directory: name the file to write")
    if make_parents and not p.parent.exists():
        writable_dir(p.parent, "directory", error)
        return p
    if not p.parent.exists():
        raise error(f"directory {p.parent} does not exist")
    if not p.parent.is_dir():
        raise error(f"{what} {p} cannot be created: {p.parent} is {_kind(p.parent)}, not a directory")
    if p.exists() and not replace:
        raise error(f"{p} already exists: refusing to overwrite it{hint}")
    if p.exists():
        try:  # opened to append, nothing written: the file is left as it was
            open(p, "ab").close()
        except OSError as e:
            raise error(f"{what} {p} cannot be written ({e.strerror or e})") from None
    else:
        _probe(p.parent, f"{what} {p} cannot be written in {p.parent}", error)
    return p


def _probe(directory: Path, message: str, error: type[Exception]) -> None:
    # Creating a file is the honest test: os.access judges by the real uid (not the effective one that writes) and
    # can be wrong on network filesystems (root squash); a run would otherwise find out at its first checkpoint.
    try:
        fd, name = tempfile.mkstemp(prefix=".photon-write-test-", dir=directory)
    except OSError as e:
        raise error(f"{message} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def _kind(p: Path) -> str:
    return "a file" if p.is_file() else "a special file"
