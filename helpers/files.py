"""Where results go, and writing them safely.

Everything the notebooks and commands make lives under one ``outputs/`` folder (git-ignored).
Files are written atomically: to a temporary file in the same folder, then renamed over the
target, so a crash never leaves half a file, and an existing file is only replaced when asked.
Explained in ``00_environment-check.ipynb``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
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


#: the errors a write meets on a machine's disks, and what each means
_WRITE_CAUSES = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "the disk quota is used up",
                 errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}
#: what to do about a disk that is full or over its quota
_FREE_SPACE = "free space there, or write elsewhere (another --out)"


def write_error(err: BaseException, path: str | os.PathLike | None = None) -> UserError | None:
    """One line for a write of ``path`` that met a full disk, a used-up quota, a read-only file system
    or a permission it lacks (an ``OSError``, or a library's error that carries the OS's code, as
    safetensors' does), saying what to do; None for any other error."""
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code is None:
        # a Rust library's I/O error (safetensors): "... (os error 28)", or "Os { code: 28, ... }"
        found = re.search(r"\(os error (\d+)\)|\bOs \{ code: (\d+)", str(err))
        code = int(found.group(1) or found.group(2)) if found else None
    if code not in _WRITE_CAUSES:
        return None
    where = path if path is not None else getattr(err, "filename", None)
    fix = _FREE_SPACE if code in (errno.ENOSPC, errno.EDQUOT) else "write to a folder you may write to (another --out)"
    return UserError(f"cannot write {where if where is not None else 'a file'}: {_WRITE_CAUSES[code]}; {fix}.")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a disk's refusal while writing ``path`` (:func:`write_error`) into its one line."""
    try:
        yield
    except Exception as err:
        said = write_error(err, path)
        if said is None:
            raise
        raise said from None


def check_writable(folder: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before any work, a folder this process cannot write into, saying why: a read-only file
    system, or a permission it lacks."""
    if os.access(folder, os.W_OK):
        return
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    cause = _WRITE_CAUSES[errno.EROFS if read_only else errno.EACCES]
    raise UserError(f"cannot write to {folder}: {cause}; choose a folder you can write to (another {flag}).")


def check_free_space(folder: str | os.PathLike, need: int, what: str) -> None:
    """Refuse, before the work that would fill it, to write ``need`` bytes of ``what`` into ``folder``
    (or the nearest folder above it that exists) when its disk has less free."""
    from helpers.report import format_bytes

    here = Path(folder).expanduser().absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    free = shutil.disk_usage(here).free
    if need > free:
        raise UserError(f"{what} needs about {format_bytes(need)} and the disk of {here} has {format_bytes(free)} "
                        f"free; {_FREE_SPACE}.")


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


def temporary_prefix(name: str) -> str:
    """The start of the name of a temporary made beside ``name`` before it is renamed into place:
    hidden, and saying which host and process made it (``.NAME.HOST-PID.``), so that a later run can
    tell one left by a process that was killed (:func:`remove_stale`) from one still being written."""
    return f".{name}.{socket.gethostname()}-{os.getpid()}."


def remove_stale(folder: str | os.PathLike, name: str) -> list[Path]:
    """Remove the temporaries of ``name`` in ``folder`` (:func:`temporary_prefix`) that a process of
    this host left when it was killed (SIGKILL cannot be caught: a killed ``convert`` leaves a folder
    the model's size). Those of a process still running, or of another host, are kept."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.{re.escape(socket.gethostname())}-(\d+)\.")
    gone = []
    with contextlib.suppress(OSError):
        for entry in sorted(Path(folder).iterdir()):
            found = pattern.match(entry.name)
            if found is None or _alive(int(found.group(1))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            gone.append(entry)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary file lives in the same folder (so the rename is atomic) and keeps the target's
    suffix (so writers that look at it, such as PIL, pick the right format). On an exception the
    temporary file is removed and the target is left untouched.
    """
    path = check_can_write(path, overwrite)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path.parent, path.stem)
        fd, tmp_name = tempfile.mkstemp(prefix=temporary_prefix(path.stem), suffix=f".tmp{path.suffix}",
                                        dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with writing(path):  # a full or read-only disk: one line naming the file, the temporary removed
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
