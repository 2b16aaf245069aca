"""The registry of model families: one `Family` record per family, each built in its own module here.

`family_of(model_type)` is how the core finds a family; `SUPPORTED_MODEL_TYPES` lists every type mm-lens loads.
Adding a family is a new module with its record plus one line in `_FAMILIES` (see ``mm_lens/ADDING_A_FAMILY.md``).
"""

from __future__ import annotations

import importlib

from mm_lens.errors import MMLensError
from mm_lens.families.base import TL_SCORES, Family, FeatureCode, KnockoutRoute

#: The family modules of this package, in the README's order; each defines ``FAMILIES``, its `Family` records.
_MODULES = ("llava", "onevision", "gemma3", "idefics3", "mistral3", "internvl", "qwen_vl", "glm4v")


def _load() -> tuple[Family, ...]:
    found: list[Family] = []
    for module in _MODULES:
        try:
            found += importlib.import_module(f"mm_lens.families.{module}").FAMILIES
        except ModuleNotFoundError as exc:
            if exc.name != f"mm_lens.families.{module}":
                raise
    return tuple(found)


#: Every family mm-lens supports, in the README's order.
_FAMILIES: tuple[Family, ...] = _load()

FAMILIES: dict[str, Family] = {model_type: family for family in _FAMILIES for model_type in family.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


def family_of(model_type: str | None, name: str = "the checkpoint") -> Family:
    """The family of a ``model_type``; an error listing the supported types when there is none."""
    family = FAMILIES.get(model_type or "")
    if family is None:
        raise MMLensError(
            f"model type {model_type!r} of {name!r} is not supported; supported types: {', '.join(FAMILIES)}"
        )
    return family


def families() -> tuple[Family, ...]:
    """Every supported family, once each."""
    return _FAMILIES


__all__ = ["FAMILIES", "SUPPORTED_MODEL_TYPES", "TL_SCORES", "Family", "FeatureCode", "KnockoutRoute",
           "families", "family_of"]
