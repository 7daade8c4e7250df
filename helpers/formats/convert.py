"""Store a model's weights in another format, once: ``python -m helpers convert``.

The copy keeps the diffusers layout, file by file: every component folder, its config, its shards
and their index, with the chosen components' tensors rewritten. With ``fp8`` each linear layer's
weight becomes float8 e4m3fn and gets a float32 scale per output row under ``<name>.weight_scale``
(:func:`helpers.formats.codecs.quantize_rows`); everything else is stored in bf16. The component folder
records its format in :data:`helpers.precision.FORMAT_FILE`, which the plans and the loaders read
(``--model FOLDER``). Components left as they are are copied (hard links where the file system
allows). The copy is written in a temporary folder next to ``out`` and renamed into place at the
end: an interrupted conversion leaves nothing behind, and an existing ``out`` is never replaced.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from helpers.errors import UserError
from helpers.files import check_free_space, check_writable, remove_stale, temporary_prefix, writing


def convertible() -> tuple[str, ...]:
    """Every component with weights of any known family (what ``--components`` may name)."""
    from helpers.families import families

    return tuple(dict.fromkeys(c for f in families() for c in f.models))


def check_out(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser()
    if out.exists():
        raise UserError(f"{out} exists; convert writes a new folder and never replaces one: choose another --out.")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} does not exist; make it first, or choose another --out.")
    check_writable(out.parent)
    return out


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        dst.mkdir()
        for child in sorted(src.iterdir()):
            _copy(child, dst / child.name)
        return
    try:
        os.link(src, dst)  # the unchanged files: no second copy on disk
    except OSError:
        shutil.copy2(src, dst)


def _convert_component(src: Path, dst: Path, cls, weights: str, progress: bool) -> dict:
    """Rewrite one component folder's shards in ``weights``; returns its tensor counts."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from helpers.offload.streamers import skeleton_from_folder
    from helpers.formats.codecs import quantize_rows
    from helpers.precision import FORMAT_FILE, WEIGHTS, quantized

    skeleton = skeleton_from_folder(src, cls)
    linear = {f"{name}.weight" for name, m in skeleton.named_modules() if quantized(m, "weight")}
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise UserError(f"{src} has no .safetensors files to convert.")
    dst.mkdir()
    for other in sorted(src.iterdir()):
        if other.suffix != ".safetensors" and not other.name.endswith(".safetensors.index.json"):
            _copy(other, dst / other.name)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"{src.name}: to {weights}")
    weight_map, total, counts = {}, 0, {"fp8": 0, "other": 0}
    try:
        for path in files:
            out: dict[str, torch.Tensor] = {}
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                for name in f.keys():
                    t = f.get_tensor(name)
                    if weights == "fp8" and name in linear:
                        out[name], out[f"{name}_scale"] = quantize_rows(t)
                        counts["fp8"] += 1
                    elif t.is_floating_point():
                        out[name] = t.to(torch.bfloat16 if weights == "fp8" else WEIGHTS[weights])
                        counts["other"] += 1
                    else:
                        out[name] = t
                        counts["other"] += 1
            save_file(out, str(dst / path.name), metadata={**metadata, "format": "pt"})
            weight_map.update({n: path.name for n in out})
            total += sum(t.numel() * t.element_size() for t in out.values())
            if bar is not None:
                bar.update(path.stat().st_size)
            del out
    finally:
        if bar is not None:
            bar.close()
    index = next(src.glob("*.safetensors.index.json"), None)
    if index is not None:
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        data.setdefault("metadata", {})["total_size"] = total
        (dst / index.name).write_text(json.dumps(data, indent=2) + "\n")
    scheme = ("float8_e4m3fn linear weights, a float32 scale per output row (<name>.weight_scale), the rest bfloat16"
              if weights == "fp8" else f"every floating tensor in {weights}")
    (dst / FORMAT_FILE).write_text(json.dumps({"weights": weights, "scheme": scheme, "tensors": counts,
                                               "bytes": total, "source": str(src.resolve())}, indent=2) + "\n")
    return counts


def convert(model: str | None, weights: str, out: str | os.PathLike, components=None,
            progress: bool = True) -> Path:
    """A copy of ``model`` at ``out`` with ``components`` stored in ``weights`` (see the module docstring);
    by default the component where the bytes are (the one a single file holds: FLUX.1's transformer)."""
    from helpers.models import resolve_model
    from helpers.precision import check_weights, folder_format

    check_weights(weights)
    ref = resolve_model(model)
    family = ref.family
    components = (family.file_component,) if components is None else tuple(components)
    unknown = [c for c in components if c not in family.models]
    if unknown or not components:
        raise UserError(f"cannot convert {', '.join(unknown) or 'nothing'}; the components are "
                        f"{', '.join(family.models)}.")
    out = check_out(out)
    src = ref.folder()
    for comp in components:
        if not (src / comp).is_dir():
            raise UserError(f"{src} has no {comp} folder to convert.")
        already = folder_format(src / comp)
        if already is not None and already != "bf16" and already != weights:
            raise UserError(f"{src / comp} is stored in {already}; convert from the original model, not from a copy.")
    check_free_space(out.parent, converted_bytes(src, components, weights), f"the {weights} copy of {src.name}")
    classes = {c: family.component(c).load_class() for c in components}
    with writing(out):  # a full or read-only disk: one line naming the copy, the temporary removed
        remove_stale(out.parent, out.name)  # what a convert that was killed (SIGKILL) left here
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out.name), dir=out.parent))
        try:
            for child in sorted(src.iterdir()):
                if child.name in components:
                    _convert_component(child, tmp / child.name, classes[child.name], weights, progress)
                elif child.name == "twin.json":  # the copy is a folder of its own, not a twin to rebuild
                    continue
                else:
                    _copy(child, tmp / child.name)
            umask = os.umask(0)
            os.umask(umask)
            for path in [tmp, *tmp.rglob("*")]:  # mkdtemp's and save_file's private modes: as any new folder
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
            os.rename(tmp, out)  # refused if out appeared meanwhile: then nothing is replaced
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def converted_bytes(src: Path, components, weights: str) -> int:
    """About what a copy of ``src`` with ``components`` in ``weights`` adds to a disk: the converted
    components' tensors at their new size (the other files are hard links where the disk allows)."""
    from helpers.precision import WEIGHTS
    from helpers.formats.sources import read_safetensors_index

    itemsize = torch.empty(0, dtype=WEIGHTS[weights]).element_size()
    return sum(math.prod(shape) * itemsize for comp in components
               for *_, shape in read_safetensors_index(src / comp).values())
