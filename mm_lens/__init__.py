"""mm-lens: cross-modal information flow in LLaVA-family models, on TransformerLens.

The top-level names (``ml.load``, ``ml.prepare``, ``ml.layer_sweep``, ...) are imported from their modules when
first used (PEP 562), so that ``import mm_lens.cli`` and ``mm-lens --help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from mm_lens.names import VERSION

#: Each top-level name and the module that defines it.
_EXPORTS = {
    "TASKS": "mm_lens.data.gqa", "load_task": "mm_lens.data.gqa", "open_image": "mm_lens.data.gqa",
    "DEFAULT_INSTRUCTION": "mm_lens.encoders",
    "MMLensError": "mm_lens.errors",
    "head_sweep": "mm_lens.heads",
    "image_token_lens": "mm_lens.image_lens",
    "MultimodalInput": "mm_lens.inputs", "prepare": "mm_lens.inputs",
    "Edge": "mm_lens.knockout", "block_hooks": "mm_lens.knockout", "knockout_hook": "mm_lens.knockout",
    "knockout_hooks": "mm_lens.knockout", "parse_edge": "mm_lens.knockout",
    "answer_forms": "mm_lens.lens", "answer_lens": "mm_lens.lens", "layer_probs": "mm_lens.lens",
    "HookedLlava": "mm_lens.model", "load": "mm_lens.model",
    "patching_sweep": "mm_lens.patching",
    "patch_map": "mm_lens.maps", "map_agreement": "mm_lens.maps",
    "RegionMap": "mm_lens.regions",
    "flow_samples": "mm_lens.sweep", "greedy_answer": "mm_lens.sweep", "layer_sweep": "mm_lens.sweep",
    "layer_window": "mm_lens.sweep",
    "Box": "mm_lens.types", "Sample": "mm_lens.types", "SampleSkip": "mm_lens.types",
}

__all__ = sorted(_EXPORTS)
__version__ = VERSION


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module 'mm_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

