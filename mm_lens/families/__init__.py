"""The registry of model families: one `Family` record per family, each built in its own module here.

`family_of(model_type)` is how the core finds a family; `SUPPORTED_MODEL_TYPES` lists every type mm-lens loads.
Adding a family is a new module with its record plus one line in `_FAMILIES` (see ``mm_lens/ADDING_A_FAMILY.md``).
"""

from __future__ import annotations

from mm_lens.errors import MMLensError
from mm_lens.families.base import TL_SCORES, FeatureCode, Family, KnockoutRoute
from mm_lens.families.llava import LLAVA, LLAVA_NEXT

#: Every family mm-lens supports, in the README's order.
_FAMILIES: tuple[Family, ...] = (LLAVA, LLAVA_NEXT)

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
