"""mm-lens: cross-modal information flow in LLaVA-family models, on TransformerLens."""

from mm_lens.data.gqa import TASKS, load_task, open_image
from mm_lens.encoders import DEFAULT_INSTRUCTION
from mm_lens.errors import MMLensError
from mm_lens.heads import head_sweep
from mm_lens.image_lens import image_token_lens
from mm_lens.inputs import MultimodalInput, prepare
from mm_lens.knockout import Edge, block_hooks, knockout_hook, knockout_hooks, parse_edge
from mm_lens.lens import answer_forms, answer_lens, layer_probs
from mm_lens.model import HookedLlava, load
from mm_lens.patching import patching_sweep
from mm_lens.regions import RegionMap
from mm_lens.sweep import flow_samples, greedy_answer, layer_sweep, layer_window
from mm_lens.types import Box, Sample, SampleSkip

__all__ = [
    "DEFAULT_INSTRUCTION", "TASKS", "Box", "Edge", "HookedLlava", "MMLensError", "MultimodalInput", "RegionMap",
    "Sample", "SampleSkip", "answer_forms", "answer_lens", "block_hooks", "flow_samples", "greedy_answer",
    "head_sweep", "image_token_lens", "knockout_hook", "knockout_hooks", "layer_probs", "layer_sweep",
    "layer_window", "load", "load_task", "open_image", "parse_edge", "patching_sweep", "prepare",
]
__version__ = "0.1.0"
