"""GLM-4V (``glm4v``: GLM-4.1V, ``Glm4vForConditionalGeneration``).

The processor smart-resizes the image to multiples of ``patch_size * merge_size`` (14 x 2 = 28), cuts it into
``patch_size`` patches, and each ``merge_size`` x ``merge_size`` cell of patches becomes one language-model token
(the vision tower's ``downsample`` convolution merges the cell, and the merger projects it):
``<|begin_of_image|>`` ``<|image|>`` x (h / 28) (w / 28) ``<|end_of_image|>``, one tile, row-major over the merged
cells. The chat template writes the begin / end markers around one ``<|image|>``, which the processor expands. The
counts come from the processor's own ``image_grid_thw``; ``pixel_values`` are flattened patches in Qwen-VL's
packing (merge cells grouped, the frame repeated ``temporal_patch_size`` times), which `qwen_pixel_tiles` folds
back into the resized image. The processor also returns ``mm_token_type_ids`` (1 at image tokens), from which the
model builds its 3-D mRoPE positions (the image's rows and columns share a start, and the text after it resumes at
the start plus the longer side), so both are passed to the forward. The language model is GLM-4's: sandwich norms,
a joint ``gate_up_proj`` MLP, QKV biases and partial rotary embeddings applied inside HF's attention before the
attention function; TL's adapter keeps HF's native attention, so the knockout goes through the attention-interface
route (`mm_lens.routes`), which replaces only the computation after q / k / v. The adapter declares torchvision,
which the language-model path never uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mm_lens.families.base import processor_without_video
from mm_lens.families.qwen_vl import QWEN2_5_VL


def _processor(path: str) -> Any:
    from transformers import Glm4vProcessor
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    return processor_without_video(path, Glm4vProcessor, Glm4vImageProcessorPil)


#: Qwen2.5-VL's record (its packing, layout, inputs, route, waived torchvision) with GLM-4V's processor and markers.
GLM4V = dataclasses.replace(
    QWEN2_5_VL, name="glm4v", title="GLM-4V", model_types=("glm4v",), processor=_processor,
    marker_tokens=("<|begin_of_image|>", "<|end_of_image|>"),
    layout_note="`<|begin_of_image|>` `<|image|>` x (h/28)(w/28) `<|end_of_image|>`, smart-resized, row-major",
)

FAMILIES = (GLM4V,)
