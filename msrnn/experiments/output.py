"""What the commands leave on disk: whole files or nothing, resumable result tables, plots."""

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager

WRITES = True        # False on the ranks of a tensor-parallel group other than 0 (cli.common.ranks)


def write_atomic(path: str, text: str):
    """Write a whole file or nothing: a temporary file in the same directory, then a rename."""
    if not WRITES:
        return
    from ..paths import why
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:                   # the directory went away or filled up since checked
        reason = why(e) if os.path.isdir(directory) else "it no longer exists"
        raise OSError(f"cannot write {path}: cannot make a file in {directory} ({reason})") \
            from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise OSError(f"cannot write {path} ({why(e)})") from None
    except BaseException:
        os.unlink(tmp)
        raise


def figure(*grid, figsize, **options):
    """A new matplotlib figure and its axes (plt.subplots), drawn off-screen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*grid, figsize=figsize, **options)


def save_figure(fig, path: str):
    """Save a matplotlib figure as PNG atomically (a temporary file, then a rename); close it."""
    import matplotlib.pyplot as plt

    if not WRITES:
        plt.close(fig)
        return
    from ..paths import why
    fig.tight_layout()
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=130)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OSError(f"cannot write {path} ({why(e)})") from None
    finally:
        plt.close(fig)


@contextmanager
def locked(directory: str):
    """Hold a directory's lock (flock on its descriptor): one process at a time inside."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                                       # closing releases the lock


class Results:
    """results.json (+ .csv) in an --out directory: the rows computed so far, so that a sweep
    that was interrupted resumes with what is missing. A directory made with another setup, or
    whose results.json is damaged, is refused with a message that says what to do. Two runs
    may share a directory (another scheme, in another terminal): each row is saved together
    with the rows the other saved meanwhile, so neither overwrites the other."""

    def __init__(self, directory: str | None, setup: dict, key: tuple, fields: list):
        self.directory, self.setup, self.key, self.fields = directory, setup, key, fields
        self.rows = self.saved()

    def saved(self) -> list:
        """The rows results.json holds now ([] without one)."""
        if self.directory is None:
            return []
        path = os.path.join(self.directory, "results.json")
        if not os.path.exists(path):
            return []
        try:
            with open(path) as f:
                saved = json.load(f)
            saved_setup, rows = saved["setup"], saved["results"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ValueError(f"{path} is damaged (not a results file this command wrote); "
                             f"delete it or use another --out directory") from None
        if saved_setup != self.setup:
            raise ValueError(f"{path} holds results of another setup ({saved_setup}); use "
                             f"another --out directory")
        return rows

    def get(self, row: dict):
        """The saved row whose key fields are those of `row`, or None."""
        key = tuple(row[k] for k in self.key)
        return next((r for r in self.rows if tuple(r.get(k) for k in self.key) == key), None)

    def add(self, row: dict):
        self.rows.append(row)
        if self.directory is None or not WRITES:
            return
        with locked(self.directory):
            self.rows += [r for r in self.saved() if self.get(r) is None]   # another run's
            write_atomic(os.path.join(self.directory, "results.json"),
                         json.dumps({"setup": self.setup, "results": self.rows}, indent=1))
            lines = [",".join(self.fields)] + [",".join("" if r[k] is None else str(r[k])
                                                        for k in self.fields) for r in self.rows]
            write_atomic(os.path.join(self.directory, "results.csv"), "\n".join(lines) + "\n")
