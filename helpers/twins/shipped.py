"""The trained twins' weights that ship with the package (``helpers/twins/*.safetensors``): where a
twin's file is and what it says of itself (the trainer's metadata and its sha256)."""

from __future__ import annotations

from pathlib import Path

from helpers.errors import UserError


#: where the package keeps trained twins' weights
TRAINED_DIR = Path(__file__).parent


def trained_weights_path(spec) -> Path | None:
    """The file of ``spec``'s trained weights (a name in ``helpers/twins/``, or a path), or None for a random twin."""
    return TRAINED_DIR / spec.trained if spec.trained else None


def trained_weights_info(spec) -> dict | None:
    """What the shipped weights file of a trained twin says of itself (its metadata), plus its sha256."""
    path = trained_weights_path(spec)
    if path is None:
        return None
    if not path.is_file():
        raise UserError(f"the trained weights of this twin are missing ({path.name} in the helpers package); "
                        "reinstall the project, or make them again with `python -m helpers train-twin`.")
    import hashlib

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return meta
