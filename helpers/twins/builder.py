"""Build a twin into a folder on first use: in its family's real diffusers layout, deterministic, atomic
(a temporary sibling renamed into place), reused while its marker (``twin.json``: the builder's version,
the spec, the shipped weights' hash) says it is what this builder makes. Each family declares its twins
(:attr:`helpers.families.Family.twins`: name -> spec, which writes itself); this module only builds them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from helpers.errors import UserError
from helpers.families import families
from helpers.files import outputs_dir
from helpers.twins.shipped import trained_weights_info

#: Bump when the builder changes what it writes; older twin folders are then rebuilt.
BUILDER_VERSION = 3
MARKER = "twin.json"


def twin_specs() -> dict:
    """Every family's twins by name (``tiny``, ``medium``...): the spec each is built from."""
    return {name: spec for family in families() for name, spec in family.twins.items()}


def _spec(name: str):
    specs = twin_specs()
    if name not in specs:
        raise UserError(f"unknown twin {name!r}; the twins are {', '.join(specs)}.")
    return specs[name]


def _marker(name: str, spec) -> dict:
    spec_dict = asdict(spec)
    info = trained_weights_info(spec)
    marker = {
        "twin": name,
        "builder_version": BUILDER_VERSION,
        "spec": json.loads(json.dumps(spec_dict)),
    }
    marker["note"] = spec.note(info is not None)
    if info is not None:
        marker["weights_sha256"] = info["sha256"]
    return marker


def _write_twin(spec, folder: Path) -> None:
    """Build every component of ``spec``'s twin and save it in ``folder`` (its family's layout)."""
    spec.write(folder)


def twin_folder(name: str) -> Path:
    """Where the twin ``name`` is kept: ``outputs/models/<name>``."""
    return outputs_dir() / "models" / name


def twin_is_built(name: str, folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a complete twin made by this builder version with these widths."""
    marker = Path(folder) / MARKER
    try:
        return json.loads(marker.read_text()) == _marker(name, _spec(name))
    except (OSError, ValueError):
        return False


def _remove_stale_builds(folder: Path) -> None:
    """Remove temporary folders that killed builds left next to ``folder`` (their process is gone)."""
    import psutil

    for stale in folder.parent.glob(f".{folder.name}.*-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if stale.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _built_here(name: str, folder: Path) -> bool:
    """True when ``folder`` holds twin ``name`` as some version of this builder left it (its marker
    names the twin and a builder version): the only kind of folder a build may replace."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("twin") == name and "builder_version" in marker


def build_twin(name: str = "tiny", folder: str | os.PathLike | None = None, rebuild: bool = False) -> Path:
    """The folder of twin ``name`` (``tiny`` or ``medium``), building it first if needed.

    Reuses a complete folder; otherwise builds into a temporary sibling folder and renames it into
    place, so an interrupted build never leaves a half-written twin behind. Deterministic: two
    builds give byte-identical files. Replaces only a folder this builder made (an older version or
    other widths of the same twin), never another folder; and where another build of the same twin
    finished first, keeps that one instead of deleting it.
    """
    if name not in twin_specs():
        raise UserError(f"unknown twin {name!r}; the twins are {', '.join(twin_specs())}.")
    folder = Path(folder) if folder is not None else twin_folder(name)
    if not rebuild and twin_is_built(name, folder):
        return folder

    def check_replaceable() -> None:
        if folder.exists() and any(folder.iterdir()) and not _built_here(name, folder):
            raise UserError(f"{folder} exists and is not a twin {name!r} built here (its {MARKER} does not say so); "
                            "nothing in it was changed: choose an empty or new folder.")

    check_replaceable()
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(folder)
    tmp = folder.parent / f".{folder.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_twin(_spec(name), tmp)
        (tmp / MARKER).write_text(json.dumps(_marker(name, _spec(name)), indent=2) + "\n")
        try:
            tmp.rename(folder)  # an absent (or empty) folder: replaced in one step
        except OSError:  # it holds something: a twin another build just finished, or one to replace
            if not rebuild and twin_is_built(name, folder):
                return folder  # the same files as ours: keep theirs, in use perhaps
            check_replaceable()
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
