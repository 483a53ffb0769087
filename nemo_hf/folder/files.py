"""Opening only regular files: a FIFO, a device (``/dev/zero``), a socket or a directory where a shard, a
predictions file or a cache file is expected would hang a reader or exhaust memory, so every reader asks
here first and names what it found instead.

No nemo_hf imports: the caches (`nemo_hf.mining.cache`, `nemo_hf.zeroshot.encode`) use it too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


class NotRegularFile(ValueError):
    """A path that holds something other than a regular file."""


def kind_of(mode: int) -> str:
    """What a ``st_mode`` is, in words."""
    for test, name in KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def is_regular_file(path: str | os.PathLike, follow_symlinks: bool = True) -> bool:
    """Whether ``path`` is a regular file (absent, unreadable or special: False); never opens it."""
    try:
        return stat.S_ISREG(os.stat(path, follow_symlinks=follow_symlinks).st_mode)
    except (OSError, ValueError):
        return False


def regular_file(path: str | os.PathLike, what: str, follow_symlinks: bool = True) -> Path:
    """``path`` when it is a regular file; FileNotFoundError when absent, `NotRegularFile` naming what is
    there otherwise. ``follow_symlinks=False`` refuses a symbolic link itself."""
    try:
        mode = os.stat(path, follow_symlinks=follow_symlinks).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    if not stat.S_ISREG(mode):
        target = "" if follow_symlinks or not stat.S_ISLNK(mode) else f" to {os.readlink(path)!r}"
        raise NotRegularFile(f"{path}: {what} is {kind_of(mode)}{target}, not a regular file")
    return Path(path)


def open_regular(path: str | os.PathLike, what: str, follow_symlinks: bool = True) -> BinaryIO:
    """``path`` opened for binary reading, checked on the open descriptor (no window for a swap between a check
    and the open): opening never blocks, a FIFO or device is refused as in `regular_file`."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except OSError as err:
        if not follow_symlinks and os.path.islink(path):  # O_NOFOLLOW's ELOOP
            raise NotRegularFile(f"{path}: {what} is a symbolic link to {os.readlink(path)!r}, not a regular file") from None
        raise OSError(f"{path}: cannot open {what} ({err.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{path}: {what} is {kind_of(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def inside(folder: str | os.PathLike, name: str, what: str) -> Path:
    """The regular file ``name`` (a relative POSIX path from a manifest) inside ``folder``: no absolute or
    ``..`` path, no symbolic link on the way, whatever wrote the name; errors name the file."""
    parts = Path(name).parts if isinstance(name, str) and name else ()
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise ValueError(f"{folder}: {what} {name!r} is not a file inside the folder (an absolute or a '..' path)")
    path = Path(folder)
    for part in parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: {what} not found (the folder is incomplete: rebuild it)") from None
        if stat.S_ISLNK(mode):
            raise NotRegularFile(
                f"{path}: {what} is a symbolic link to {os.readlink(path)!r}; a folder is read only from the files inside it"
            )
    return regular_file(path, what, follow_symlinks=False)
