"""The library's plain name lists, torch-free: what the command line offers (``mm-lens --help`` imports no torch).

Each list is written down once, here; the module named beside it (which imports torch) re-imports it
(``from mm_lens.names import SITES``) and checks names against it.
"""

from __future__ import annotations

#: mm-lens's version, recorded in every run's configuration (`mm_lens.__version__`; pyproject.toml's version).
VERSION = "0.1.0"

#: Protocols a run can ask for (`mm_lens.protocol.PROTOCOL_NAMES`); "auto" picks one from the checkpoint.
PROTOCOL_NAMES = ("auto", "study", "checkpoint")
#: Lens readouts below the top layer (`mm_lens.protocol.READOUTS`).
READOUTS = ("raw", "norm")
#: Activation sites activation patching can write (`mm_lens.patching.SITES`).
SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
#: How a counterfactual partner is drawn from the data (`mm_lens.patching.PAIR_MODES`).
PAIR_MODES = ("image", "options")
#: Sweep engines by name (the keys of `mm_lens.engines.ENGINES`; the default is `mm_lens.engines.DEFAULT_ENGINE`).
ENGINE_NAMES = ("reference", "fast")
#: The engine every sweep, run and command uses unless told otherwise (`mm_lens.engines.DEFAULT_ENGINE`).
DEFAULT_ENGINE = "fast"
#: Patch-map methods (`mm_lens.maps.METHODS`): causal knockout, attention mass, first-order gradient attribution.
MAP_METHODS = ("knockout", "attention", "gradient")
#: The patch-map grouping that takes the sample's object boxes (else a number of patches per side).
MAP_BOX_GROUP = "box"
#: The blocks of the study, in the order its figures use (`mm_lens.knockout.STUDY_BLOCKS`).
STUDY_BLOCKS = ("Image->Question", "Image->Last", "Question->Last", "Last->Last")

__all__ = [
    "DEFAULT_ENGINE", "ENGINE_NAMES", "MAP_BOX_GROUP", "MAP_METHODS", "PAIR_MODES", "PROTOCOL_NAMES", "READOUTS",
    "SITES", "STUDY_BLOCKS", "VERSION",
]
