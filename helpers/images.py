"""Saving generated images with what made them.

PNG files carry text metadata (prompt, seed, steps, guidance, size, model, ...), so an image in
``outputs/images/`` always says how to make it again. Written atomically; an existing image is
only replaced when asked. Explained in ``00_environment-check.ipynb``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from helpers.files import atomic_path


def save_image(image, path: str | os.PathLike, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Save a PIL image as PNG at ``path`` with ``metadata`` as PNG text chunks; return the path.

    Values that are not strings are stored as JSON. Refuses to replace an existing file unless
    ``overwrite`` is set.
    """
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    if path.suffix.lower() != ".png":
        from helpers.errors import UserError

        raise UserError(f"{path.name}: images are saved as PNG (their metadata needs it); use a .png name.")
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    with atomic_path(path, overwrite=overwrite) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_image_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The PNG text metadata of an image saved by :func:`save_image`."""
    from PIL import Image

    with Image.open(path) as img:
        return dict(getattr(img, "text", {}) or {})


def enlarge(image, factor: int = 4):
    """A small image scaled up with visible pixels (nearest neighbour), for display only."""
    from PIL import Image

    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio of ``image`` against ``reference`` (8-bit images), in dB: 20 log10(255 / RMS
    difference); infinite for identical pixels. Used in ``06_weights-and-compute.ipynb``."""
    import math

    import numpy as np

    a = np.asarray(image, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        from helpers.errors import UserError

        raise UserError(f"cannot compare images of sizes {a.shape} and {b.shape}.")
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 20 * math.log10(255 / math.sqrt(mse))
