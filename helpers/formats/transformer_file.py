"""The FLUX.1 transformer as one file, the way the ComfyUI / Forge world holds it: a GGUF
quantization or a single ``.safetensors`` (bf16, fp8), in Black Forest Labs' key layout.

:func:`write_transformer_file` writes one from any model's transformer (the twins included), so the
tests and benchmarks hold real files without a download. :func:`check_transformer_file` reads a
file's header against a model's config (:mod:`helpers.formats.sources`, :mod:`helpers.families.flux1.layout`): the
variant (dev has ``guidance_in``, schnell does not), every tensor present, its shape, its type
readable, all before any weight is read, each failure a :class:`~helpers.errors.UserError` that
says what the file is and what to use. :func:`read_transformer_state` reads the weights, each
diffusers tensor from its rows of the file's tensors, decoded into one dtype: the reference every
loader of such a file is measured against.

Writing: a GGUF file quantizes every 2-D weight whose rows are whole blocks of its type (``q8_0``,
``q4_0``, ``q4_1``, ``q5_0``, ``q5_1`` through the ``gguf`` package; ``q6_k`` through
:func:`helpers.formats.quants.quantize_q6_k`), keeps the other 2-D tensors in BF16 and the 1-D ones (biases,
norms) in F32, as the community's files do. A ``.safetensors`` file holds ``bf16``; ``fp8`` (every
2-D weight in float8 e4m3fn with a float32 scale per row, ``<name>.weight_scale``, the rest bf16,
the scheme of :mod:`helpers.precision`); or ``fp8-cast`` (e4m3fn without scales, as
``flux1-dev-fp8.safetensors`` is). Files are written to a temporary name and renamed into place;
an existing file is never replaced.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from helpers.errors import UserError
from helpers.files import check_writable, remove_stale, temporary_prefix, writing
from helpers.families import Family, default_family
from helpers.formats.sources import Entry, WeightsFile, WeightsSource, read_entry, read_safetensors_index, read_weights_file

#: formats a transformer file can be written in, by container
GGUF_FORMATS = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_1": "Q5_1", "q5_0": "Q5_0", "q4_1": "Q4_1", "q4_0": "Q4_0",
                "bf16": "BF16"}
SAFETENSORS_FORMATS = ("bf16", "fp8", "fp8-cast")
#: safetensors' plain types -> torch
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn}


def _check_out(out: Path, fmt: str) -> str:
    if out.exists():
        raise UserError(f"{out} exists; a transformer file is never replaced: choose another --out.")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} does not exist; make it first, or choose another --out.")
    check_writable(out.parent)
    kinds = {".gguf": GGUF_FORMATS, ".safetensors": SAFETENSORS_FORMATS}
    if out.suffix not in kinds:
        raise UserError(f"{out.name}: a transformer file ends in .gguf or .safetensors.")
    if fmt not in kinds[out.suffix]:
        raise UserError(f"a {out.suffix} file is written as {', '.join(kinds[out.suffix])}, not {fmt!r}.")
    return out.suffix[1:]


def _gguf_tensor(name: str, t: torch.Tensor, qtype: str):
    """(array, gguf type) of one tensor: quantized where its rows are whole blocks of ``qtype``."""
    import gguf

    from helpers.formats.quants import TYPES, quantize, quantize_q6_k

    block = TYPES[qtype].block
    if t.dim() == 2 and qtype != "BF16" and t.shape[1] % block == 0:
        kind = gguf.GGMLQuantizationType[qtype]
        # the same bytes as gguf's quantizer, on a GPU or on many cores (gguf's numpy runs on one:
        # 55 M values/s for Q8_0, 4 minutes for FLUX.1's transformer; on 2 cores it is as fast as torch)
        if qtype in ("Q8_0", "Q4_0") and (torch.cuda.is_available() or torch.get_num_threads() >= 4):
            return quantize(t.cuda() if torch.cuda.is_available() else t, qtype).cpu().numpy(), kind
        x = t.float().numpy()
        if qtype == "Q6_K":
            return quantize_q6_k(x), gguf.GGMLQuantizationType.Q6_K
        return gguf.quants.quantize(x, kind), kind
    x = t.float().numpy()
    if t.dim() >= 2:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8), gguf.GGMLQuantizationType.BF16
    return x, None  # F32


def write_transformer_file(model: str | os.PathLike | None, fmt: str, out: str | os.PathLike,
                           progress: bool = True) -> Path:
    """``model``'s transformer (a name or folder, as for ``--model``) written as one file at ``out``
    (``.gguf`` or ``.safetensors``) in ``fmt``, in the BFL key layout; see the module docstring."""
    from helpers.models import resolve_model

    out = Path(out).expanduser()
    container = _check_out(out, fmt)
    ref = resolve_model(model)
    family = ref.family
    layout = family.layout_module()
    folder = ref.folder() / family.file_component
    if not folder.is_dir():
        raise UserError(f"{folder.parent} has no {family.file_component} folder to write.")
    # held in the dtype the checkpoint stores (bf16 for every model here: half of float32's RAM),
    # each tensor widened to float32 only while it is quantized
    stored = {e[3] for e in read_safetensors_index(folder).values()}
    dtype = torch.bfloat16 if stored == {"BF16"} else torch.float32
    transformer = family.component(family.file_component).load_class().from_pretrained(folder, dtype=dtype)
    state = layout.to_bfl(transformer.state_dict(), transformer.config)
    del transformer
    variant = layout.variant_of_keys(state)
    with writing(out):  # a full or read-only disk: one line naming the file, the temporary removed
        remove_stale(out.parent, out.name)  # what a writer that was killed (SIGKILL) left here
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(out.name), dir=out.parent)
        os.close(fd)
        try:
            names = sorted(state)
            if container == "gguf":
                import gguf

                writer = gguf.GGUFWriter(tmp, layout.GGUF_ARCH)
                writer.add_string("general.name", f"{family.title}-{variant} transformer")
                writer.add_string(f"{layout.GGUF_ARCH}.variant", variant)
                bar = _bar(progress, len(names), f"{out.name}: {fmt}")
                for name in names:
                    array, kind = _gguf_tensor(name, state.pop(name), GGUF_FORMATS[fmt])
                    writer.add_tensor(name, array, raw_dtype=kind)
                    bar.update()
                bar.close()
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
                writer.close()
            else:
                from safetensors.torch import save_file

                from helpers.formats.codecs import quantize_rows

                tensors = {}
                for name in names:
                    t = state.pop(name)
                    if fmt == "fp8" and t.dim() == 2:
                        tensors[name], tensors[name.removesuffix(".weight") + ".weight_scale"] = quantize_rows(t)
                    elif fmt == "fp8-cast" and t.dim() == 2:
                        tensors[name] = t.float().clamp(-448, 448).to(torch.float8_e4m3fn)
                    else:
                        tensors[name] = t.to(torch.bfloat16).contiguous()
                save_file(tensors, tmp, metadata={"format": "pt", "variant": variant, "weights": fmt})
            os.chmod(tmp, 0o666 & ~_umask())
            os.link(tmp, out)  # refused if out appeared meanwhile: nothing is replaced
        finally:
            os.unlink(tmp)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor")


def file_variant(wf: WeightsFile, family: Family | None = None) -> str:
    """The variant a file's keys say it is (FLUX.1: ``dev`` with the guidance embedder, else ``schnell``)."""
    layout = (family or default_family()).layout_module()
    return layout.variant_of_keys(_key(k, layout) for k in wf.tensors)


def _key(name: str, layout) -> str:
    return name[len(layout.PREFIX):] if name.startswith(layout.PREFIX) else name


def check_transformer_file(path: str | os.PathLike, config, family: Family | None = None,
                           ) -> tuple[WeightsFile, dict[str, list[tuple[Entry, int | None, int | None]]]]:
    """The header of transformer file ``path`` checked against a transformer ``config`` of ``family``
    (FLUX.1 by default); returns the file and, per diffusers tensor, its pieces ``(entry, first row,
    last row)``. Reads no weight."""
    family = family or default_family()
    L = family.layout_module()
    wf = read_weights_file(path)
    entries = {_key(k, L): e for k, e in wf.tensors.items()}
    scales = {k for k in entries if k.endswith(".weight_scale")}
    layout = L.bfl_layout(config)
    wants = family.variant_of(config if isinstance(config, dict) else dict(config))
    wanted = {p.key for pieces in layout.values() for p in pieces}
    missing = sorted(k for k in wanted - set(entries) if not L.variant_key(k))
    extra = sorted(k for k in set(entries) - wanted - scales if not L.variant_key(k))
    if not missing and not extra:  # a transformer of these widths: which variant?
        has = file_variant(wf, family)
        if has != wants:
            raise UserError(L.other_variant(wf.path.name, has, wants))
    missing, extra = sorted(wanted - set(entries)), sorted(set(entries) - wanted - scales)
    if missing or extra:
        raise UserError(f"{wf.path.name} is not a {family.title} transformer in the BFL layout: missing "
                        f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                        f"{'...' if len(extra) > 3 else ''}.")
    shapes = _bfl_shapes(config, family)
    for key, shape in shapes.items():
        if tuple(entries[key].shape) != shape:
            raise UserError(f"{wf.path.name}: {key} is {tuple(entries[key].shape)}, this model's is {shape}: the file "
                            "is of a model of another size; use the file made for this model.")
    from helpers.formats.quants import TYPES

    readable = {"F32", "F16", "BF16", "F8_E4M3"} | set(TYPES)
    odd = sorted({e.dtype for e in entries.values()} - readable)
    if odd:
        raise UserError(f"{wf.path.name} holds tensors in {', '.join(odd)}, which are not read here.")
    pieces = {name: [(entries[p.key], p.start, p.stop) for p in ps] for name, ps in layout.items()}
    return wf, pieces


def _bfl_shapes(config, family: Family) -> dict[str, tuple[int, ...]]:
    """The shape of every BFL tensor of a transformer with ``config``, from its skeleton (no weights)."""
    from helpers.architecture import empty_weights

    cfg = dict(config) if not isinstance(config, dict) else config
    with empty_weights():
        skeleton = family.component(family.file_component).load_class().from_config(cfg)
    meta = {k: v for k, v in skeleton.state_dict().items()}
    return {k: tuple(v.shape) for k, v in family.layout_module().to_bfl(meta, skeleton.config).items()}


def read_piece(entry: Entry, start: int | None, stop: int | None, path: Path) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The stored bytes of rows ``start:stop`` of ``entry`` (uint8) and their shape."""
    offset, nbytes = entry.rows(start, stop)
    count = entry.shape[0] if entry.shape else 1
    a, b, _ = slice(start, stop).indices(count)
    raw = np.fromfile(path, dtype=np.uint8, count=nbytes, offset=offset)
    if raw.size != nbytes:
        raise UserError(f"{path} ended while reading {entry.name}: the file changed or was cut short.")
    return torch.from_numpy(raw), (b - a, *entry.shape[1:])


def decode_piece(raw: torch.Tensor, dtype_name: str, shape, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Stored bytes of one piece -> values in ``dtype`` (GGUF blocks, or a plain dtype with an optional row scale)."""
    from helpers.formats.quants import dequantize

    if dtype_name in _TORCH:
        values = raw.view(_TORCH[dtype_name]).reshape(shape)
        if scale is not None:
            from helpers.formats.codecs import dequantize_rows

            return dequantize_rows(values, scale, dtype)
        return values.to(dtype)
    return dequantize(raw, dtype_name, shape, dtype)


def read_transformer_state(path: str | os.PathLike, config, dtype: torch.dtype = torch.float32,
                           family: Family | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the transformer in file ``path``, in diffusers' names, decoded into ``dtype``:
    checked first (:func:`check_transformer_file`), then read piece by piece."""
    family = family or default_family()
    L = family.layout_module()
    wf, pieces = check_transformer_file(path, config, family)
    entries = {_key(k, L): e for k, e in wf.tensors.items()}
    state = {}
    for name, parts in pieces.items():
        values = []
        for entry, start, stop in parts:
            raw, shape = read_piece(entry, start, stop, wf.path)
            scale_entry = entries.get(_key(entry.name, L).removesuffix(".weight") + ".weight_scale")
            scale = None
            if scale_entry is not None:
                s_raw, s_shape = read_piece(scale_entry, start, stop, wf.path)
                scale = s_raw.view(torch.float32).reshape(s_shape)
            values.append(decode_piece(raw, entry.dtype, shape, scale, dtype))
        state[name] = torch.cat(values) if len(values) > 1 else values[0]
    return state


def load_transformer_file(path: str | os.PathLike, config, compute: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu", family: Family | None = None):
    """The family's transformer (FLUX.1's by default) with ``config`` holding the weights of file ``path`` as the file
    stores them (GGUF blocks as bytes, with their type beside them in ``<name>_gguf``; fp8 with its
    row scales, or plainly cast; bf16, f16, f32), each layer decoded into ``compute`` as it runs
    (:func:`helpers.offload.upcast.upcast_layerwise`). Checked first (:func:`check_transformer_file`):
    a file that does not fit the model is refused before any weight is read."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    from helpers.offload.upcast import upcast_layerwise

    family = family or default_family()
    index, forms = stream_index(path, config, family)
    cls = family.component(family.file_component).load_class()
    with init_empty_weights():
        model = to_file_storage(cls.from_config(dict(config)), forms, index)
    device = torch.device(device)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in index:
            set_module_tensor_to_device(model, name, device, value=read_entry(index[name]))
        elif t.device.type == "meta":
            raise UserError(f"{name} has no value in {Path(path).name}; cannot load this transformer.")
        else:  # a GGUF type, made with the skeleton
            set_module_tensor_to_device(model, name, device, value=t)
    model.eval()
    upcast_layerwise(model, compute)
    return model


def stream_index(path: str | os.PathLike, config, family: Family | None = None) -> tuple[dict, dict]:
    """For a loader reading by offsets: ``(index, forms)`` of transformer file ``path`` checked
    against ``config``. ``index``: every diffusers tensor (and fp8 row scale, ``<name>_scale``) ->
    ``(file, offset, bytes, dtype, stored shape)`` as :func:`helpers.formats.sources.read_safetensors_index`
    gives for a folder, GGUF blocks as ``U8`` rows x row bytes; a tensor made of several pieces of
    the file (FLUX's final modulation, whose halves BFL stores swapped) -> a list of those.
    ``forms``: parameter -> ``(stored dtype, stored shape, GGUF type number or None)``, what
    :func:`to_file_storage` makes of a skeleton."""
    from helpers.formats.quants import TYPES

    family = family or default_family()
    L = family.layout_module()
    wf, pieces = check_transformer_file(path, config, family)
    entries = {_key(k, L): e for k, e in wf.tensors.items()}
    index: dict = {}
    forms: dict = {}
    for name, parts in pieces.items():
        kind = parts[0][0].dtype
        located = []
        for entry, start, stop in parts:
            offset, nbytes = entry.rows(start, stop)
            count = entry.shape[0] if entry.shape else 1
            rows = len(range(*slice(start, stop).indices(count)))
            if kind in _TORCH:
                located.append((wf.path, offset, nbytes, kind, [rows, *entry.shape[1:]]))  # safetensors' names
            else:
                located.append((wf.path, offset, nbytes, "U8", [rows, nbytes // max(rows, 1)]))
            scale = entries.get(_key(entry.name, L).removesuffix(".weight") + ".weight_scale")
            if scale is not None and kind == "F8_E4M3":
                s_offset, s_nbytes = scale.rows(start, stop)
                index.setdefault(f"{name}_scale", []).append((wf.path, s_offset, s_nbytes, "F32", [rows]))
        index[name] = located if len(located) > 1 else located[0]
        total_rows = sum(p[4][0] for p in located)
        stored_shape = [total_rows, *located[0][4][1:]]
        forms[name] = (_TORCH.get(kind, torch.uint8), stored_shape, None if kind in _TORCH else TYPES[kind].id)
    for name in [n for n in index if n.endswith("_scale")]:
        if len(index[name]) == 1:
            index[name] = index[name][0]
    return index, forms


def to_file_storage(model: torch.nn.Module, forms: dict, index: dict) -> torch.nn.Module:
    """A skeleton (meta device) holding its parameters in the stored forms of a transformer file
    (``forms`` from :func:`stream_index`): GGUF weights as uint8 rows x row bytes with their type in
    ``<name>_gguf`` (a real tensor: it says how to decode), fp8 weights with a meta ``<name>_scale``
    where the file has scales (read with the resident weights)."""
    from helpers.formats.codecs import GGUF_SUFFIX

    for name, (dtype, shape, gguf_id) in forms.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._parameters[leaf] = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"),
                                                     requires_grad=False)
        if gguf_id is not None:
            owner.register_buffer(f"{leaf}{GGUF_SUFFIX}", torch.tensor(gguf_id, dtype=torch.int32))
        if f"{name}_scale" in index:
            owner.register_buffer(f"{leaf}_scale", torch.empty(shape[0], dtype=torch.float32, device="meta"))
    return model


@dataclass(frozen=True)
class TransformerFile(WeightsSource):
    """A transformer file checked against a model, once, at the edge (``--transformer FILE``): what
    the plans count (its stored bytes, block by block, from the header) and the loaders read, a
    :class:`~helpers.formats.sources.WeightsSource` (its stored forms need decoding: ``encoded``)."""

    path: Path
    format: str  # "gguf" or "safetensors"
    variant: str  # "dev" or "schnell"
    types: tuple[tuple[str, int], ...]  # (tensor type, how many), most first
    nbytes: int
    index: dict = field(compare=False, repr=False, default_factory=dict)
    forms: dict = field(compare=False, repr=False, default_factory=dict)

    @property
    def label(self) -> str:
        """``Q4_0 GGUF``, ``F8_E4M3 safetensors``: the file's quantized type (else its first) and container."""
        plain = ("F32", "F16", "BF16")
        main = next((t for t, _ in self.types if t not in plain), self.types[0][0])
        return f"{main} {'GGUF' if self.format == 'gguf' else 'safetensors'}"

    @property
    def scaled(self) -> bool:
        """Whether its fp8 weights carry a float32 scale per row (this project's fp8 file)."""
        return any(name.endswith("_scale") for name in self.index)

    encoded = True

    @property
    def where(self) -> str:
        return str(self.path)

    def dress(self, skeleton: torch.nn.Module) -> torch.nn.Module:
        """``skeleton`` (in place, on the meta device) holding its tensors in this file's stored forms."""
        return to_file_storage(skeleton, self.forms, self.index)

    def skeleton(self, skeleton: torch.nn.Module) -> torch.nn.Module:
        """A copy of a transformer skeleton (meta) in this file's stored forms (the original kept)."""
        import copy

        return self.dress(copy.deepcopy(skeleton))

    def as_dict(self) -> dict:
        return {"path": self.path.name, "format": self.format, "variant": self.variant, "types": dict(self.types),
                "bytes": self.nbytes}


def open_transformer_file(path: str | os.PathLike, config, family: Family | None = None) -> TransformerFile:
    """``path`` checked against a transformer ``config`` of ``family`` (:func:`check_transformer_file`)
    and indexed for reading by offsets; reads its header only."""
    index, forms = stream_index(path, config, family)
    wf = read_weights_file(path)
    return TransformerFile(wf.path.resolve(), wf.format, file_variant(wf, family), tuple(wf.types().items()), wf.nbytes,
                           index, forms)
