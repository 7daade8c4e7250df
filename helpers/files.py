"""Where results go, and writing them safely.

Everything the notebooks and commands make lives under one ``outputs/`` folder (git-ignored).
Files are written atomically: to a temporary file in the same folder, then renamed over the
target, so a crash never leaves half a file, and an existing file is only replaced when asked.
Explained in ``00_environment-check.ipynb``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from helpers.errors import UserError

#: Environment variable that moves the whole ``outputs/`` folder (CI, tests, shared machines).
OUTPUTS_ENV = "FLUX_OUTPUTS"


def project_root() -> Path | None:
    """The project's folder (the one with ``pyproject.toml`` and ``notebooks/``), if installed from it."""
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file() and (here / "notebooks").is_dir():
        return here
    return None


def outputs_dir() -> Path:
    """The folder for everything the project makes: ``$FLUX_OUTPUTS``, else ``<project>/outputs``.

    Outside a project checkout (an installed package) it falls back to ``./outputs``.
    """
    env = os.environ.get(OUTPUTS_ENV)
    if env:
        return Path(env).expanduser().resolve()
    root = project_root()
    return (root / "outputs") if root else Path.cwd().resolve() / "outputs"


def in_outputs(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is inside the project's outputs folder (:func:`outputs_dir`), whose
    subfolders the command line makes on demand; anywhere else a missing folder is likely a typo."""
    try:
        Path(folder).expanduser().resolve().relative_to(outputs_dir())
    except ValueError:
        return False
    return True


#: what a path is when it is not a regular file, by the test of its mode
_NOT_FILES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_a_file(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is not a regular file ("a folder", "a FIFO (named pipe)", "a socket", "a
    character device", "a block device"; "missing" when nothing is there, "unreadable" when ``stat``
    fails), or None for a regular file or a link to one. Asked with ``stat`` before anything opens the
    path: opening a FIFO waits for a writer forever, and a device's bytes never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "unreadable"
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _NOT_FILES if test(mode)), "not a regular file")


def check_file(path: str | os.PathLike, what: str, remedy: str) -> Path:
    """``path`` when it is a regular file; otherwise a :class:`UserError` that says what it is instead,
    what was expected (``what``, "an embeddings file") and what to do (``remedy``)."""
    path = Path(path).expanduser()
    kind = not_a_file(path)
    if kind == "missing":
        raise UserError(f"no {what.removeprefix('an ').removeprefix('a ')} at {path}; {remedy}.")
    if kind == "unreadable":
        try:
            os.stat(path)
        except OSError as err:
            raise UserError(f"{path} cannot be read ({err.strerror}); {remedy}.") from None
    if kind:
        raise UserError(f"{path} is {kind}, not {what}; {remedy}.")
    return path


def check_can_write(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before any work, to replace an existing file unless ``overwrite`` is set."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name to write.")
    if path.exists() and not overwrite:
        raise UserError(
            f"{path} already exists; choose another name, or allow replacing it (--overwrite on the command line, "
            "overwrite=True in code, the 'replace' box in a widget)."
        )
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary file lives in the same folder (so the rename is atomic) and keeps the target's
    suffix (so writers that look at it, such as PIL, pick the right format). On an exception the
    temporary file is removed and the target is left untouched.
    """
    path = check_can_write(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not overwrite and path.exists():
            raise UserError(f"{path} appeared while writing; kept it, nothing replaced.")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are for sharing, as any new file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_folder(component: str) -> Path:
    """A fresh folder under ``outputs/offload/`` for one run's offloaded copies of ``component``: two
    runs at once, or two models whose folders share a name, never share one. Remove it with
    :func:`remove_folder` when the run ends."""
    root = outputs_dir() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{component}-", dir=root))


def remove_folder(folder: str | os.PathLike) -> None:
    """Remove a run's folder of offloaded copies, once the model that mapped them is gone."""
    import gc
    import shutil

    gc.collect()  # the memory maps of the offloaded tensors go with the model
    shutil.rmtree(folder, ignore_errors=True)


def remove_partial(path: str | os.PathLike) -> list[Path]:
    """Remove what an interrupted :func:`atomic_path` write to ``path`` left behind (its temporary
    files, never ``path`` itself); for a writer that was killed before it could clean up."""
    path = Path(path)
    gone = sorted(path.parent.glob(f".{path.stem}.*.tmp{path.suffix}"))
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def folder_size(path: str | os.PathLike) -> int:
    """Total bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
