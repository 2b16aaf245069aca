"""mm-lens: cross-modal information flow in LLaVA-family models, on TransformerLens."""

from mm_lens.data.gqa import TASKS, Box, Sample, load_task, open_image
from mm_lens.errors import MMLensError
from mm_lens.knockout import Block, block_hooks, knockout_hook, knockout_hooks, parse_block
from mm_lens.lens import answer_forms, answer_lens, layer_probs
from mm_lens.model import HookedLlava, load
from mm_lens.regions import DEFAULT_INSTRUCTION, MultimodalInput, RegionMap, prepare
from mm_lens.sweep import greedy_answer, layer_window, sweep_samples
from mm_lens.sweep import sweep as layer_sweep  # `mm_lens.sweep` stays the module

__all__ = [
    "DEFAULT_INSTRUCTION", "TASKS", "Block", "Box", "HookedLlava", "MMLensError", "MultimodalInput", "RegionMap",
    "Sample", "answer_forms", "answer_lens", "block_hooks", "greedy_answer", "knockout_hook", "knockout_hooks",
    "layer_probs", "layer_sweep", "layer_window", "load", "load_task", "open_image", "parse_block", "prepare",
    "sweep_samples",
]
__version__ = "0.1.0"
