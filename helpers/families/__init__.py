"""What a model family is, in one object: the one place that names a family's classes and blocks.

A :class:`Family` says which pipeline it is (``model_index.json``'s ``_class_name``), its components
(each one's library class, the stage it belongs to, how the stage places it, its block lists in call
order), what the text stage hands over (the embeddings schema), the usual settings per variant, the
method's budget and reference model, and the few calls that differ between families (encoding a
prompt, making the diffusion pipeline, a component's example inputs for the activation count). Every
other module asks a family; none names FLUX.1's classes, components or block names itself.

Families are found by pipeline class (:func:`family_for_pipeline`), which is how a folder says what it
holds; an unknown class is refused by name. :func:`register` adds one (a test adds a toy family so).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from typing import Callable

from helpers.errors import UserError

STAGES = ("text_encoding", "diffusion")


@dataclass(frozen=True)
class Component:
    """One subfolder of a family's checkpoint."""

    name: str
    library: str  # the package of its class: "transformers" or "diffusers"
    class_name: str
    role: str = "model"  # "model", "tokenizer" or "scheduler"
    stage: str | None = None  # the stage that loads it (tokenizers: the stage of their encoder)
    #: how the stage places it: "mapped" (split across tiers, block by block) or "whole" (one tier)
    placement: str = "whole"
    config_class: str | None = None  # transformers: the config class its config dict builds
    required_key: str | None = None  # a key its config must have (tells its config from another's)
    block_lists: tuple[str, ...] = ()  # the lists of repeated blocks, in call order
    short: str = ""  # "T5"
    long: str = ""  # "T5 encoder"
    colour: str = "#7f7f7f"
    activation: str = ""  # what one forward of it is, where its activations are counted
    fingerprint_keys: tuple[str, ...] = ()  # config keys an embeddings file's fingerprint covers
    #: why it cannot run in fp8 under accelerate's hooks, where it cannot (a refusal); else empty
    fp8_stream_only: str = ""
    #: its module classes whose own code reads a child's weight dtype: upcast as one when they run
    upcast_groups: tuple[str, ...] = ()
    #: the part of it its stage computes, cut from a skeleton (an LLM encoder read up to a middle layer:
    #: its later layers, final norm and head are never run); None: all of it. Plans place this part.
    computes: Callable | None = None

    def load_class(self):
        return getattr(importlib.import_module(self.library), self.class_name)

    def computed(self, module):
        """The part of ``module`` (its skeleton) that its stage runs: :attr:`computes`, or all of it."""
        return self.computes(module) if self.computes is not None else module

    def skeleton(self, config: dict):
        """The module from ``config`` (call under :func:`helpers.architecture.empty_weights` for a skeleton)."""
        cls = self.load_class()
        if self.config_class is not None:
            return cls(getattr(importlib.import_module(self.library), self.config_class).from_dict(config))
        # a published config may keep a key its class no longer takes (FLUX.2's VAE: force_upcast), which
        # diffusers would warn of at every skeleton: the class's own arguments only
        import inspect

        takes = inspect.signature(cls.__init__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in takes.values()):
            config = {k: v for k, v in config.items() if k in takes or k.startswith("_")}
        return cls.from_config(config)


@dataclass(frozen=True)
class Variant:
    """The usual settings of a variant (FLUX.1-dev, -schnell), and the text length it takes at most."""

    steps: int
    guidance: float
    text_length: int
    max_text_length: int
    guidance_embedder: bool = True


@dataclass(frozen=True)
class Family:
    name: str  # "flux1"
    title: str  # "FLUX.1"
    pipeline: str  # model_index.json's _class_name
    components: tuple[Component, ...]
    variants: dict[str, Variant]
    #: the variant a model is, from its transformer config and its ``model_index.json`` (``None`` where
    #: not known): its name in ``variants``
    variant_of: Callable[..., str]
    #: the embeddings file's tensors (the text stage's outputs), the first the text's [batch, tokens, width]
    embedding_names: tuple[str, ...]
    #: their shapes from (configs, batch, tokens): what diffusion expects and the file holds
    embedding_shapes: Callable[[dict, int, int], dict[str, tuple[int, ...]]]
    #: extra tensors an embeddings file may hold (not needed by diffusion)
    optional_embeddings: tuple[str, ...] = ()
    #: the weights format each stage stores in by default, and the text stage's compute with why
    stage_weights: dict[str, str] = field(default_factory=dict)
    text_compute: tuple[str, str] = ("fp32", "")
    method_budget: str = "0=8.5GiB,cpu=30GiB"
    reference_model: str = ""
    #: the real models by short name (-> hub id), the gated ones, and those whose configs ship with helpers
    names: dict[str, str] = field(default_factory=dict)
    gated: frozenset = frozenset()
    shipped: dict[str, str] = field(default_factory=dict)
    #: its twins by name (``tiny``, ``medium``): specs that know their configs (``configs()``), what their
    #: weights are (``note(trained)``) and how to write themselves in the layout (``write(folder)``); see
    #: :mod:`helpers.twins.builder`
    twins: dict = field(default_factory=dict)
    #: the module of the single-file key layout (BFL's) of its transformer
    layout: str | None = None
    #: the pipeline class that runs it (library, class); the family's own by default
    pipeline_class_path: tuple[str, str] | None = None
    #: calls that differ between families, given the family's loaded parts
    encode: Callable | None = None  # (family, parts, prompts, device, length, variant) -> {tensor: value}
    embeddings_facts: Callable | None = None  # (parts) -> what else decides the embeddings, for the file's header
    token_report: Callable | None = None  # (parts, prompts, length) -> rows
    truncation_warnings: Callable | None = None  # (rows, length) -> [warning]
    diffusion_pipeline: Callable | None = None  # (family, {part: module}, variant) -> pipeline without encoders
    pipeline_inputs: Callable | None = None  # (tensors) -> keyword arguments of the pipeline's call
    example_inputs: Callable | None = None  # (component, module, dtype, h, w, tokens, device) -> (module, inputs)
    block_counts: Callable | None = None  # (module) -> text
    checks: Callable | None = None  # (variant, text_length) -> refusal or None
    bench_inputs: Callable | None = None  # (component, module, dtype, h, w, tokens) -> seeded random inputs
    diffusers_single_file: Callable | None = None  # (folder, file, compute) -> diffusers' own reading of a file
    setting_notes: Callable | None = None  # (variant, steps, guidance, text_length) -> notes; raises a refusal
    #: (variant, guidance, the file's tensor names) -> a refusal of an embeddings file the run cannot use, or None
    embeddings_check: Callable | None = None

    # ------------------------------------------------------------------ questions asked of a family

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise UserError(f"{self.title} has no component {name!r}; its components are {', '.join(self.subfolders)}.")

    @property
    def subfolders(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    @property
    def models(self) -> tuple[str, ...]:
        """The components with weights, in checkpoint order."""
        return tuple(c.name for c in self.components if c.role == "model")

    def stage_models(self, stage: str) -> tuple[str, ...]:
        return tuple(c.name for c in self.components if c.role == "model" and c.stage == stage)

    def whole(self, stage: str) -> tuple[str, ...]:
        return tuple(n for n in self.stage_models(stage) if self.component(n).placement == "whole")

    def mapped(self, stage: str) -> tuple[str, ...]:
        return tuple(n for n in self.stage_models(stage) if self.component(n).placement == "mapped")

    def main(self, stage: str) -> str:
        """The component a stage splits across tiers (the one its memory is about)."""
        return self.mapped(stage)[0]

    @property
    def file_component(self) -> str:
        """The component a single file of the family holds (``--transformer FILE``): diffusion's split one."""
        return self.main("diffusion")

    def stage_parts(self, stage: str) -> tuple[str, ...]:
        """Every subfolder a stage reads (models, tokenizers, the scheduler of diffusion)."""
        return tuple(c.name for c in self.components if c.stage == stage)

    def pipeline_class(self):
        library, name = self.pipeline_class_path or ("diffusers", self.pipeline)
        return getattr(importlib.import_module(library), name)

    def block_lists(self, component: str) -> tuple[str, ...]:
        return self.component(component).block_lists

    def layout_module(self):
        if self.layout is None:
            raise UserError(f"{self.title} reads no single files.")
        return importlib.import_module(self.layout)

    def variant(self, name: str | None) -> Variant:
        return self.variants.get(name or "", next(iter(self.variants.values())))

    @property
    def text_tensor(self) -> str:
        """The embeddings tensor whose second dimension is the text length."""
        return self.embedding_names[0]

    def fingerprint(self, configs: dict[str, dict]) -> str:
        """A short hash of the text encoders' shapes (each component's ``fingerprint_keys``): two
        models share it only if their embeddings agree."""
        facts = {c.name: {k: configs[c.name].get(k) for k in c.fingerprint_keys}
                 for c in self.components if c.fingerprint_keys}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]

    def embeddings_bytes(self, configs: dict, batch: int, tokens: int) -> int:
        """The embeddings file in bfloat16, with room for the header and the optional tensors."""
        total = 0
        for shape in self.embedding_shapes(configs, batch, tokens).values():
            n = 1
            for d in shape:
                n *= d
            total += 2 * n
        return total + 4 * tokens * 4 + (64 << 10)


#: every family this process knows, by pipeline class
_FAMILIES: dict[str, Family] = {}


def family_of_repo(repo_id: str | None) -> Family | None:
    """The family whose model (a name's repository, or a shipped config's) ``repo_id`` is; None if none."""
    return next((f for f in families() if repo_id in f.names.values() or repo_id in f.shipped), None)


def register(family: Family) -> Family:
    _FAMILIES[family.pipeline] = family
    return family


def unregister(family: Family) -> None:
    _FAMILIES.pop(family.pipeline, None)


def families() -> tuple[Family, ...]:
    _load_builtin()
    return tuple(_FAMILIES.values())


def family_for_pipeline(class_name) -> Family:
    """The family whose pipeline is ``class_name`` (a folder's ``model_index.json`` ``_class_name``)."""
    _load_builtin()
    if isinstance(class_name, str) and class_name in _FAMILIES:
        return _FAMILIES[class_name]
    said = f"a {class_name}" if isinstance(class_name, str) and class_name else "no pipeline (no _class_name)"
    raise UserError(f"holds {said}, by its model_index.json; this project runs {', '.join(_FAMILIES)} folders")


def default_family() -> Family:
    """The family of the default model (the tiny twin): FLUX.1."""
    return family_named("flux1")


def family_named(name: str) -> Family:
    _load_builtin()
    for family in _FAMILIES.values():
        if family.name == name:
            return family
    raise UserError(f"no model family {name!r}; the families are {', '.join(f.name for f in _FAMILIES.values())}.")


def block_lists_of(module) -> tuple[str, ...]:
    """The block lists of a loaded or skeleton module, found by its class in the known families."""
    _load_builtin()
    cls = type(module).__name__
    for family in _FAMILIES.values():
        for c in family.components:
            if c.class_name == cls and c.block_lists:
                return c.block_lists
    return ()


def family_of_class(class_name: str) -> tuple[Family, Component] | None:
    """``(family, component)`` of the first known family that has a component of class ``class_name``."""
    _load_builtin()
    for family in _FAMILIES.values():
        for c in family.components:
            if c.class_name == class_name:
                return family, c
    return None


def _load_builtin() -> None:
    if not _FAMILIES:
        from helpers.families import flux1, flux2

        register(flux1.FAMILY)
        register(flux2.FAMILY)


__all__ = ["Component", "Family", "STAGES", "Variant", "block_lists_of", "family_of_class", "default_family", "families",
           "family_for_pipeline", "family_named", "register", "unregister"]
