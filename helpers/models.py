"""Model names: one name picks the model everywhere (:func:`resolve_model`, a :class:`ModelRef`).

- ``tiny`` (default) and ``medium``: twins of a family (FLUX.1's: :mod:`helpers.families.flux1.twin`),
  built here on first use (:mod:`helpers.twins.builder`) in the real diffusers layout with the real
  classes and block structure but small widths; they load back with the same ``from_pretrained``
  calls a real checkpoint gets. ``tiny`` builds from the trained weights the package ships
  (:mod:`helpers.twins.shipped`; :mod:`helpers.twins.training` made them on the shapes world of
  :mod:`helpers.twins.world`), so it draws what it is told in that world; ``medium`` has random
  weights (benchmarks need its size, not its pictures), and its images are noise.
- the real models by short name (``flux-dev``, ``flux-schnell``: each family's ``names``), fetched
  from the hub only when asked to.
- ``flux-dev-random``: a real architecture (the shipped configs) with random bfloat16 weights,
  written here on first use (:mod:`helpers.twins.random`), for full-size benchmarks without a download.
- any other hub id (``owner/name``), or a local folder in the diffusers layout (its family read from
  ``model_index.json``).

``$FLUX_MODEL`` overrides the notebooks' default for a whole run. Explained in
``00_environment-check.ipynb``.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from helpers.errors import UserError
from helpers.families import Family, default_family, families, family_for_pipeline, family_named, family_of_repo
from helpers.files import not_a_file
from helpers.twins.builder import build_twin, twin_folder, twin_is_built, twin_specs
from helpers.twins.random import RANDOM, RANDOM_DEFAULT, build_random

#: Environment variable that picks the model for a whole run of the notebooks.
MODEL_ENV = "FLUX_MODEL"
DEFAULT_MODEL = "tiny"

def _names() -> dict[str, str]:
    """The real models by short name, across the families (flux-dev -> black-forest-labs/FLUX.1-dev)."""
    return {short: repo for f in families() for short, repo in f.names.items()}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------- the model knob


@dataclass(frozen=True)
class ModelRef:
    """A model name resolved once: a twin, a hub repository, or a local folder.

    Made at the edge (:func:`resolve_model`: the command line, a widget, a stage's entry point) and
    handed down, so the plans, the loaders and the embeddings file all ask one object: what it is
    (:attr:`kind`, :attr:`label`), its :attr:`configs` (read once, no weights, no download), the
    :attr:`fingerprint` an embeddings file must carry, its :attr:`variant`, and :meth:`folder`.
    """

    name: str
    kind: Literal["twin", "hub", "local", "random"]
    repo_id: str | None = None
    path: Path | None = None

    @cached_property
    def family(self) -> Family:
        """What the model is (:mod:`helpers.families`): a twin's by its builder, a known name's by its
        repository, a folder's by its ``model_index.json`` (``_class_name``)."""
        if self.kind == "twin":
            return family_named(twin_specs()[self.name].family)
        if self.kind == "random":
            return family_of_repo(RANDOM[self.name])
        if self.path is not None:
            return family_for_pipeline(_pipeline_class(self.path / "model_index.json", self.name))
        known = family_of_repo(self.repo_id)
        if known is not None:
            return known
        index = _cached_model_index(self.repo_id)
        return family_for_pipeline(_pipeline_class(index, self.name)) if index is not None else default_family()

    @property
    def gated(self) -> bool:
        return self.repo_id in self.family.gated

    @property
    def label(self) -> str:
        """The name that finds this model again from another process: a local folder's full path."""
        return str(self.path) if self.kind == "local" else self.name

    @property
    def variant(self) -> str | None:
        """The family's variant (FLUX.1: ``dev`` with a guidance embedder, else ``schnell``), for the
        usual steps, guidance and text length.

        Known names answer directly; a local folder answers from its transformer config; an unknown
        hub id gives ``None``.
        """
        if self.kind in ("twin", "random"):
            return twin_specs()[self.name].variant if self.kind == "twin" else "dev"
        repo = self.repo_id
        if repo in self.family.shipped:
            from importlib import resources

            shipped = resources.files("helpers") / "configs" / self.family.shipped[repo]
            return self.family.variant_of(self._configs["transformer"],
                                          json.loads((shipped / "model_index.json").read_text()))
        if self.path is not None:
            try:
                cfg = json.loads((self.path / "transformer" / "config.json").read_text())
                index = json.loads((self.path / "model_index.json").read_text())
                return self.family.variant_of(cfg, index if isinstance(index, dict) else None)
            except (OSError, ValueError):
                return None
        return None

    @property
    def usual(self):
        """The usual steps, guidance and text length of this model's variant (:class:`Variant`)."""
        return self.family.variant(self.variant)

    @cached_property
    def _configs(self) -> dict[str, dict]:
        return _read_configs(self)

    @property
    def configs(self) -> dict[str, dict]:
        """Each component's config (a fresh copy: a caller may change its own); read once per object.

        Twins from their builder, FLUX.1-dev/schnell from the shipped configs, a local folder from
        its ``config.json`` files, another hub id from the Hugging Face cache if its configs are there.
        """
        return copy.deepcopy(self._configs)

    @cached_property
    def fingerprint(self) -> str:
        """The text encoders' shapes, hashed: what an embeddings file made by this model carries
        (:meth:`helpers.families.Family.fingerprint`)."""
        return self.family.fingerprint(self._configs)

    def folder(self, components=None, download: bool = False, rebuild: bool = False, configs=()) -> Path:
        """A local folder in the diffusers layout: built (a twin), found in the cache, or given.
        ``components``: only those (a hub model, the random model); ``configs``: components of which
        a hub model needs only the config (see :func:`hub_patterns`)."""
        if self.kind == "twin":
            return build_twin(self.name, rebuild=rebuild)
        if self.kind == "random":
            return build_random(self.name, components=components or RANDOM_DEFAULT, rebuild=rebuild)
        if self.kind == "local":
            return self.path
        return hub_snapshot(self, components=components, download=download, configs=configs)

    def as_dict(self) -> dict:
        """JSON for another process: :func:`resolve_model` of ``label`` makes it again."""
        return {"name": self.name, "kind": self.kind, "repo_id": self.repo_id, "label": self.label,
                "fingerprint": self.fingerprint}


def default_model() -> str:
    """The notebooks' model: ``$FLUX_MODEL`` when set, else ``tiny``."""
    return os.environ.get(MODEL_ENV, "").strip() or DEFAULT_MODEL


def _check_model_folder(path: Path, text: str) -> None:
    """A folder is the pipeline its ``model_index.json`` names, and every file in its components'
    folders is a file (``stat`` only: a FIFO or a device there would hang or never end a read)."""
    index = path / "model_index.json"
    kind = not_a_file(index)
    if kind == "missing":
        raise UserError(f"{text} has no model_index.json: it is not a model folder in the diffusers layout.")
    if kind:
        raise UserError(f"{index} is {kind}, not a file; a model folder's model_index.json is a JSON file.")
    try:
        family_for_pipeline(_pipeline_class(index, text))
    except UserError as err:
        raise UserError(f"{text} {err}: give one of those, or one of {', '.join([*twin_specs(), *_names()])}.") from None
    for component in sorted(p for p in path.iterdir() if p.is_dir()):
        for file in sorted(component.iterdir()):
            kind = not_a_file(file)
            if kind == "missing":
                raise UserError(f"{file} is a link to nothing; download or copy the model folder again.")
            if kind and kind != "a folder":
                raise UserError(f"{file} is {kind}, not a file; a model folder holds files: copy it again.")


def _pipeline_class(index: Path, text: str):
    """The ``_class_name`` of a ``model_index.json`` (whatever it holds: the family lookup judges it)."""
    try:
        return json.loads(Path(index).read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{index} is not readable JSON; download or copy the model folder {text} again.") from None


def _cached_model_index(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # noqa: BLE001 - an id the cache cannot hold: nothing cached
        return None
    return Path(found) if isinstance(found, str) else None


def resolve_model(name: str | ModelRef | None = None) -> ModelRef:
    """Say what a model name means (no building, no download): see the module docstring.

    A :class:`ModelRef` is returned as it is: a function handed one resolves nothing again."""
    if isinstance(name, ModelRef):
        return name
    if name is None:
        name = default_model()
    text = str(name).strip()
    if not text:
        raise UserError(f"no model named; use one of {', '.join([*twin_specs(), *_names()])}, a hub id or a folder.")
    if text in twin_specs():
        return ModelRef(text, "twin")
    if text in RANDOM:
        return ModelRef(text, "random")
    if text in _names():
        return ModelRef(text, "hub", repo_id=_names()[text])
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{text} is a file; a model is a folder in the diffusers layout (with model_index.json).")
        _check_model_folder(path, text)
        return ModelRef(text, "local", path=path.resolve())
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(text)
        except HFValidationError as err:
            raise UserError(f"{text!r} is not a valid hub id ({err}); and no such folder exists either.") from None
        return ModelRef(text, "hub", repo_id=text)
    raise UserError(
        f"unknown model {text!r}: no such folder, and not a hub id; "
        f"use one of {', '.join([*twin_specs(), *_names(), *RANDOM])}, a hub id (owner/name) or a local folder."
    )


def shipped_model(name: str | ModelRef) -> ModelRef:
    """A real model whose published configs ship with ``helpers`` (``flux-dev``, ``flux2-klein-4b``, ...):
    what a footprint of the real thing reads, with no download. Anything else (a twin, a folder, another
    hub id) is a :class:`UserError` that names them."""
    ref = resolve_model(name)
    if ref.kind != "hub" or ref.repo_id not in ref.family.shipped:
        shipped = [short for f in families() for short, repo in f.names.items() if repo in f.shipped]
        raise UserError(f"{ref.name!r} is not a real model whose configs ship with helpers; name one of "
                        f"{', '.join(shipped)} (a twin or a folder holds its own configs: footprint() measures it as it is).")
    return ref


def hub_patterns(components: tuple[str, ...] | list[str] | None = None, configs=(), family=None) -> list[str]:
    """The files to fetch for ``components`` only (all by default), never the single-file checkpoints;
    of ``configs``, only their ``config.json`` (a transformer whose weights come from a file of its own)."""
    every = (family or default_family()).subfolders
    wanted = every if components is None else tuple(components)
    unknown = [c for c in (*wanted, *configs) if c not in every]
    if unknown:
        raise UserError(f"unknown component(s) {', '.join(unknown)}; the components are {', '.join(every)}.")
    return ["model_index.json", *[f"{c}/*" for c in wanted], *[f"{c}/config.json" for c in configs if c not in wanted]]


def _hub_help(ref: ModelRef) -> str:
    page = f"https://huggingface.co/{ref.repo_id}"
    if ref.gated:
        return (
            f"{ref.repo_id} is gated: accept its licence at {page} while logged in, then log in here "
            "with `hf auth login` (or set HF_TOKEN)"
        )
    return f"see {page}"


def hub_snapshot(ref: ModelRef, components=None, download: bool = False, configs=()) -> Path:
    """The local folder of a hub model, from the Hugging Face cache; fetch it only if ``download``.

    Only the files of ``components`` (and the config of ``configs``) are looked for or fetched. Access
    to a gated model is checked before any download, with a message that says how to get it.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = hub_patterns(components, configs, ref.family)
    try:
        return Path(snapshot_download(ref.repo_id, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        if not download:
            raise UserError(
                f"{ref.repo_id} is not in your Hugging Face cache; fetch it with "
                f"`python -m helpers model {ref.name} --download` ({_hub_help(ref)})."
            ) from None
    from huggingface_hub import auth_check

    try:
        auth_check(ref.repo_id)
    except GatedRepoError:
        raise UserError(f"no access to {ref.repo_id}: {_hub_help(ref)}.") from None
    except RepositoryNotFoundError:
        raise UserError(f"{ref.repo_id} was not found on the hub (or is private: log in with `hf auth login`).") from None
    except Exception as err:  # network down, proxy, ...
        raise UserError(f"cannot reach the hub to fetch {ref.repo_id} ({type(err).__name__}); check your connection.") from None
    return Path(snapshot_download(ref.repo_id, allow_patterns=patterns))


def local_folder(ref: ModelRef) -> Path | None:
    """The folder ``ref`` already has on this machine, without building or fetching anything; None if none."""
    if ref.kind == "local":
        return ref.path
    if ref.kind == "twin":
        folder = twin_folder(ref.name)
        return folder if twin_is_built(ref.name, folder) else None
    if ref.kind == "random":
        folder = twin_folder(ref.name)
        return folder if folder.is_dir() else None
    try:
        return hub_snapshot(ref, download=False)
    except UserError:
        return None


def _read_configs(ref: ModelRef) -> dict[str, dict]:
    from helpers.architecture import folder_configs, shipped_configs

    family = ref.family
    if ref.kind == "twin":
        return twin_specs()[ref.name].configs()
    if ref.kind == "random":
        return shipped_configs(family.shipped[RANDOM[ref.name]], family)
    if ref.kind == "local":
        return folder_configs(ref.path, family)
    if ref.repo_id in family.shipped:
        return shipped_configs(family.shipped[ref.repo_id], family)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(ref.repo_id, allow_patterns=["*/config.json"], local_files_only=True))
    except Exception:
        raise UserError(
            f"no config shipped for {ref.repo_id} and none in your Hugging Face cache; fetch its configs with "
            f"`hf download {ref.repo_id} --include '*/config.json'` or pass a local folder."
        ) from None
    return folder_configs(folder, family)


def component_configs(model: str | ModelRef | None = None) -> tuple[str, dict[str, dict]]:
    """``(name, configs)`` for a model (see :attr:`ModelRef.configs`); no weights, no download."""
    ref = resolve_model(model)
    return ref.name, ref.configs


def model_path(name: str | ModelRef | None = None, components=None, download: bool = False, rebuild: bool = False,
               configs=()) -> Path:
    """A local folder in the diffusers layout for model ``name`` (see :meth:`ModelRef.folder`)."""
    return resolve_model(name).folder(components, download=download, rebuild=rebuild, configs=configs)


def describe_pipeline(pipe, family=None) -> list[dict]:
    """One row per component of a loaded pipeline: class, blocks, parameters, bytes, dtype."""
    from helpers.precision import stored_bytes

    family = family or family_for_pipeline(type(pipe).__name__)
    rows = []
    for comp in family.models:
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        rows.append({
            "component": comp,
            "class": type(module).__name__,
            "blocks": family.block_counts(module),
            "params": sum(p.numel() for p in module.parameters()),
            "bytes": stored_bytes(module),
            "dtype": str(next(module.parameters()).dtype).replace("torch.", ""),
        })
    return rows
