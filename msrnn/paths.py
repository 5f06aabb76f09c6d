"""Where msrnn writes: checked before the work, and each failure said in one plain sentence.

A command that writes (results in --out, a checkpoint in --dir, a plot in --plot) checks its
path first, so that a typo costs a second, not an hour of decoding that has nowhere to go. The
check does what the write will do (it makes the directory, or a test entry in it) instead of
asking os.access, which answers "yes" to root on a read-only file system, in /proc or in /sys.
The messages say what failed and why in words, not "[Errno 2] No such file or directory"."""

import errno
import os
import tempfile

WHY = {errno.ENOENT: "it accepts no new entries", errno.EACCES: "permission denied",
       errno.EPERM: "not permitted", errno.EROFS: "a read-only file system",
       errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
       errno.ENAMETOOLONG: "the name is too long", errno.ENOTDIR: "a part of it is a file"}


def why(e: OSError) -> str:
    """An OSError's cause in words."""
    return WHY.get(e.errno, (e.strerror or str(e)).lower())


def writable_dir(path: str, what: str, make: bool = True) -> str:
    """`path` as a directory this process can write in: made (with its missing parents) if
    `make`, else only shown to be makeable (a test directory made and removed). Returns `path`;
    raises ValueError naming `what` (e.g. "--out"), the path, what failed and why."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path} is a file, not a directory; give a directory (it is "
                         f"created if missing)")
    if os.path.isdir(path):
        probe(path, what)
        return path
    missing = os.path.abspath(path)                  # the first directory that must be made
    while not os.path.lexists(os.path.dirname(missing)):
        missing = os.path.dirname(missing)
    parent = os.path.dirname(missing)
    whose = "the directory" if missing == os.path.abspath(path) else \
        f"its parent {missing}, which does not exist,"
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {path}: cannot create {whose} because {parent} is a file, not "
                         f"a directory; choose another path")
    try:
        os.makedirs(path) if make else os.mkdir(missing)
    except FileExistsError:         # another run made it since the check (two runs, one --out)
        return writable_dir(path, what, make)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot create {whose} in {parent} ({why(e)}); choose "
                         f"another path") from None
    if make:
        probe(path, what)
    else:
        os.rmdir(missing)
    return path


def writable_file(path: str, what: str) -> str:
    """`path` as a file this process can write (atomically: a temporary file beside it, then a
    rename): not a directory, in a directory it can write in (made if missing)."""
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory; give a file name")
    writable_dir(os.path.dirname(path) or ".", f"{what} {path}: its directory")
    return path


def probe(directory: str, what: str):
    """Make and remove a file in `directory`: the one sure way to know a write will work."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".msrnn-probe-")
    except OSError as e:
        raise ValueError(f"{what} {directory}: cannot write in this directory ({why(e)}); "
                         f"choose another directory") from None
    os.close(fd)
    os.unlink(name)
