"""The hand-off between the stages: prompt embeddings in a safetensors file.

Stage 1 (text encoding) writes the family's tensors (:mod:`helpers.families`; FLUX.1: ``prompt_embeds``
``[batch, tokens, joint_dim]``, ``pooled_prompt_embeds`` ``[batch, pooled_dim]`` and ``text_ids``
``[tokens, 3]``) in bfloat16, with string metadata that says what made them, the family included. Stage 2 (diffusion) validates the file against the model
that will consume it before any weight is loaded: the header first (names, shapes, dtypes,
fingerprint), then every value finite (the tensors are small), and explains any mismatch in one
message that says what to do. Written atomically: a crash never leaves half a file under the final
name; values that are not finite are never written. Explained in ``02_text-encoding-offload.ipynb``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from helpers.errors import UserError
from helpers.families import Family, default_family, family_named
from helpers.files import atomic_path, check_file, not_a_file

FORMAT = "flux-embeddings"
FORMAT_VERSION = "1"
STORED_DTYPE = torch.bfloat16
MAKER = "notebook 02_text-encoding-offload or `python -m helpers encode`"

def fingerprint(configs: dict[str, dict], family=None) -> str:
    """A short hash of the text encoders' shapes: two models share it only if their embeddings agree.

    ``configs`` maps each component to its config dict (for instance from
    :func:`helpers.models.component_configs`); ``family``: the model's (FLUX.1 by default).
    """
    return (family or default_family()).fingerprint(configs)


#: a folder's text-encoder files up to this size are hashed whole; larger ones by samples
_HASH_WHOLE_BYTES = 64 * 2**20
_SAMPLE_BYTES = 2**20


def weights_identity(folder: str | os.PathLike | None, family: Family | None = None) -> str | None:
    """A short hash of the text encoders' weights in a model folder: two builds of the same shapes
    (a random twin and a trained one, a model retrained or replaced) get different ones.

    Reads the text stage's models' safetensors files (FLUX.1: CLIP's and T5's): whole when they are small
    (a twin: milliseconds), otherwise each file's name, size, header and 1 MiB from its start,
    middle and end (the real T5's 9.5 GB in a few ms, yet any retraining changes it). None when the
    folder holds no text-encoder weights (a model fetched for diffusion only): then only the shapes
    (:func:`fingerprint`) are checked.
    """
    if folder is None:
        return None
    family = family or default_family()
    files = [f for part in family.stage_models("text_encoding")
             for f in sorted((Path(folder) / part).glob("*.safetensors"))]
    if not files:
        return None
    total = sum(f.stat().st_size for f in files)
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.parent.name}/{f.name}:{size}".encode())
        with open(f, "rb") as handle:
            if total <= _HASH_WHOLE_BYTES:
                digest.update(handle.read())
                continue
            for offset in (0, max(0, size // 2 - _SAMPLE_BYTES // 2), max(0, size - _SAMPLE_BYTES)):
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    import helpers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "helpers": helpers.__version__}


@dataclass
class EmbeddingsHeader:
    """What a file says about itself, read without loading a tensor."""

    path: Path
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @property
    def prompts(self) -> list[str]:
        return json.loads(self.metadata.get("prompts", "[]"))

    @property
    def family(self) -> Family:
        """The family whose text stage made the file (files without the entry were made by FLUX.1's)."""
        return family_named(self.metadata.get("family") or default_family().name)

    @property
    def batch(self) -> int:
        return self.shapes[self.family.text_tensor][0]

    @property
    def max_sequence_length(self) -> int:
        return int(self.metadata["max_sequence_length"])

    def summary(self) -> dict:
        return {
            "file": str(self.path),
            "bytes": self.path.stat().st_size,
            "tensors": {k: f"{self.dtypes[k]} {list(v)}" for k, v in self.shapes.items()},
            **{k: (json.loads(v) if k in ("prompts", "versions") else v) for k, v in self.metadata.items()},
        }


def save_embeddings(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    *,
    model: str,
    fingerprint: str,
    prompts: list[str],
    max_sequence_length: int,
    family: Family | None = None,
    overwrite: bool = False,
    extra: dict[str, str] | None = None,
    weights: str | None = None,
) -> Path:
    """Write the text stage's ``tensors`` (by name, as the family's pipeline returns them) in bfloat16
    with their metadata, atomically; refuse to replace unless asked.

    ``fingerprint``: the text encoders' shapes (:func:`fingerprint`); ``weights``: their weights'
    identity (:func:`weights_identity`), recorded as ``text_encoder_weights`` when known; ``family``:
    whose tensors they are (FLUX.1 by default).
    """
    family = family or default_family()
    names, optional = family.embedding_names, family.optional_embeddings
    if set(names) - set(tensors) or set(tensors) - set(names) - set(optional):
        raise ValueError(f"{family.title}'s embeddings are {', '.join(names)} (and {', '.join(optional) or 'nothing'} "
                         f"optional), not {', '.join(tensors)}")
    text = tensors[names[0]]
    if text.ndim != 3 or any(tensors[n].ndim < 2 for n in names[1:]):
        raise ValueError(f"{names[0]} must be [batch, tokens, dim] and {', '.join(names[1:]) or 'the rest'} "
                         "[batch, dim]")
    batches = {n: tensors[n].shape[0] for n in names}
    if len(set(batches.values())) != 1 or text.shape[0] != len(prompts):
        raise ValueError("batch sizes disagree: " + ", ".join(f"{b} {n}" for n, b in batches.items())
                         + f", {len(prompts)} prompts")
    from safetensors.torch import save_file

    tensors = {n: t.detach().to("cpu", STORED_DTYPE if n in names else t.dtype).contiguous()
               for n, t in tensors.items() if t is not None}
    for name, tensor in tensors.items():  # in the stored dtype: a float32 value past bfloat16's range is infinite there
        bad = not_finite(tensor)
        if bad:
            raise UserError(
                f"the text encoders gave {bad:,} of {tensor.numel():,} values of {name} that are not finite (NaN or "
                f"infinite in {str(tensor.dtype).replace('torch.', '')}), so nothing was written to {path}: encode in "
                "float32 (an encoder in float16 overflows), or check the model's weights."
            )
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "model": str(model),
        "fingerprint": fingerprint,
        **({"text_encoder_weights": weights} if weights else {}),
        "prompts": json.dumps(list(prompts), ensure_ascii=False),
        "max_sequence_length": str(int(max_sequence_length)),
        "dtype": str(STORED_DTYPE).replace("torch.", ""),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": json.dumps(_versions()),
        **(extra or {}),
    }
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def not_finite(tensor: torch.Tensor) -> int:
    """How many values of ``tensor`` are NaN or infinite (0 for a tensor of whole numbers)."""
    if not tensor.is_floating_point():
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum())


def check_values(header: EmbeddingsHeader, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors with values that are not finite: they would make images of nothing but noise."""
    made = f"made by model {header.metadata.get('model')!r}" + (
        f" on {header.metadata['created']}" if header.metadata.get("created") else "")
    family = header.family
    for name in (*family.embedding_names, *family.optional_embeddings):
        if name in tensors:
            bad = not_finite(tensors[name])
            if bad:
                raise UserError(
                    f"{header.path}: {name} holds {bad:,} of {tensors[name].numel():,} values that are not finite "
                    f"(NaN or infinite); the file ({made}) was damaged or its text encoder overflowed: encode the "
                    f"prompts again with {MAKER}."
                )


def read_header(path: str | os.PathLike) -> EmbeddingsHeader:
    """The file's metadata, tensor names, shapes and dtypes, from the header alone."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    kind = not_a_file(path)  # before anything opens it: a FIFO would wait for a writer forever
    if kind == "missing":
        raise UserError(f"no embeddings file at {path}; make one with {MAKER}.")
    if kind:
        check_file(path, "an embeddings file", f"give the embeddings file (.safetensors) made by {MAKER}")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); make it again with {MAKER}.") from None
    return EmbeddingsHeader(path, metadata, shapes, dtypes)


def validate(
    path: str | os.PathLike,
    expected_fingerprint: str | None = None,
    widths: dict[str, int] | None = None,
    expected_weights: str | None = None,
    expected_family: str | None = None,
) -> EmbeddingsHeader:
    """Check an embeddings file against the model that will consume it, before any weight loads.

    Checks the format, the tensor names, shapes and dtypes, and (when given) the fingerprint of the
    text encoders, the family and each tensor's width (its last dimension, as the transformer takes it:
    ``widths``), from the header; then reads the tensors once
    and checks that every value is finite. Raises :class:`UserError` saying what is wrong and what
    to do. ``expected_weights``: the consuming model's :func:`weights_identity`; where the file
    records one too, they must agree (the same shapes with other weights embed differently).
    :func:`load_embeddings` does the same and returns the tensors too.
    """
    return load_embeddings(path, expected_fingerprint, widths, expected_weights, expected_family)[1]


def _validate_header(
    path: str | os.PathLike,
    expected_fingerprint: str | None = None,
    widths: dict[str, int] | None = None,
    expected_weights: str | None = None,
    expected_family: str | None = None,
) -> EmbeddingsHeader:
    header = read_header(path)
    meta, shapes = header.metadata, header.shapes
    where = header.path
    if meta.get("format") != FORMAT:
        raise UserError(f"{where} is a safetensors file but not an embeddings file (no '{FORMAT}' header); make one with {MAKER}.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{where} has format version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION!r}; "
            f"make it again with {MAKER}."
        )
    try:
        family = header.family
    except UserError:
        raise UserError(f"{where} was made by a model family this code does not know "
                        f"({meta.get('family')!r}); make it again with {MAKER}.") from None
    if expected_family is not None and family.name != expected_family:
        raise UserError(f"{where} holds {family.title} embeddings and this model is not {family.title}; encode the "
                        f"prompt again with this model ({MAKER}).")
    names = family.embedding_names
    missing = [k for k in names if k not in shapes]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}; make it again with {MAKER}.")
    pe, rest = shapes[names[0]], {n: shapes[n] for n in names[1:]}
    if len(pe) != 3 or any(len(s) != 2 or s[0] != pe[0] for s in rest.values()):
        said = " and ".join(f"{n} {list(shapes[n])}" for n in names)
        raise UserError(
            f"{where} has {said}: expected [batch, tokens, dim]{' and [batch, dim]' if rest else ''} with the same "
            f"batch; make it again with {MAKER}."
        )
    for name in names:
        if header.dtypes[name] != "BF16":
            raise UserError(f"{where}: {name} is {header.dtypes[name]}, expected BF16; make it again with {MAKER}.")
    try:
        prompts = header.prompts
        seq = header.max_sequence_length
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{where} has a damaged header (prompts / max_sequence_length); make it again with {MAKER}.") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or pe[0] < 1 or pe[1] < 1:
        raise UserError(f"{where} has a damaged header or empty tensors (no prompts, or no tokens); make it again with {MAKER}.")
    if len(prompts) != pe[0] or seq != pe[1]:
        raise UserError(
            f"{where}: header says {len(prompts)} prompt(s) of {seq} tokens, tensors hold {pe[0]} of {pe[1]}; "
            f"make it again with {MAKER}."
        )
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        raise UserError(
            f"{where} was encoded by model {meta.get('model')!r} (text encoders {meta.get('fingerprint')}), "
            f"whose embeddings do not fit this model (text encoders {expected_fingerprint}); encode the prompt "
            f"again with the same model ({MAKER})."
        )
    made_with = meta.get("text_encoder_weights")
    if expected_weights is not None and made_with is not None and made_with != expected_weights:
        raise UserError(
            f"{where} was encoded by model {meta.get('model')!r} on {meta.get('created', 'an unknown date')} with other "
            f"text-encoder weights than this model's (weights {made_with}, this model {expected_weights}: same "
            f"shapes, but the model was rebuilt, retrained or replaced since), so its embeddings would mean something "
            f"else here; encode the prompts again with this model ({MAKER})."
        )
    for name, want in (widths or {}).items():
        if want is not None and name in shapes and shapes[name][-1] != want:
            raise UserError(
                f"{where}: {name} are {shapes[name][-1]} wide, this transformer takes {want}; encode the "
                f"prompt again with this model ({MAKER})."
            )
    return header


def load_embeddings(path: str | os.PathLike, expected_fingerprint: str | None = None,
                    widths: dict[str, int] | None = None, expected_weights: str | None = None,
                    expected_family: str | None = None) -> tuple[dict[str, torch.Tensor], EmbeddingsHeader]:
    """Validate as :func:`validate` does and return ``(tensors, header)``: the tensors on the CPU,
    bfloat16, read once."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = _validate_header(path, expected_fingerprint, widths, expected_weights, expected_family)
    try:
        tensors = load_file(str(header.path))
    except (SafetensorError, OSError, ValueError) as err:  # a header that promises more bytes than the file has
        raise UserError(f"{header.path} cannot be read whole ({err}); make it again with {MAKER}.") from None
    check_values(header, tensors)
    return tensors, header
