"""An independent re-implementation of the pipeline of the CVPR 2025 study
"Cross-modal Information Flow in Multimodal Large Language Models" (Zhang et al.), for tests.

Written from the study's code (``InformationFlow.py``, ``methods.py``, ``utils.py``,
``last_position_answer_prob.py`` of FightingFighting/cross-modal-information-flow-in-MLLM) and the
LLaVA-NeXT code it imports (``llava/mm_utils.py``, ``llava/conversation.py``,
``llava/model/llava_arch.py``, ``llava/constants.py``), NOT from mm_lens. It runs on plain Hugging
Face ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` checkpoints (float32,
CPU, eager attention) and uses only their weights: the prompt, the tokenisation, the image
preprocessing, the packing of the image features into the sequence, the region positions, the
attention knockout, the greedy answer and the logit lens are all done here the study's way.

Where the study's code had to be interpreted for an HF checkpoint, the comment says so (``HF:``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

# ------------------------------------------------------------------------------------------ constants

IMAGE_TOKEN_INDEX = -200  # llava/constants.py
DEFAULT_IMAGE_TOKEN = "<image>"
INSTRUCTION = " \nAnswer the question using a single word or phrase."  # InformationFlow.py __getitem__

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
LLAMA3_BOS = "<|begin_of_text|>"
CONV_MODES = ("vicuna_v1", "llava_llama_3")

# ------------------------------------------------------------------------------------------ prompt


def _render_llama3_instruct(messages: list[dict[str, str]], bos_token: str, add_generation_prompt: bool) -> str:
    """The chat template of meta-llama/Meta-Llama-3-8B-Instruct, hard-coded::

        {% set loop_messages = messages %}{% for message in loop_messages %}
        {% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'
                         + message['content'] | trim + '<|eot_id|>' %}
        {% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}
        {% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}

    (jinja's ``trim`` is Python's ``str.strip()``; ``+`` binds after the filter, so only the content is trimmed.)
    """
    out = ""
    for i, message in enumerate(messages):
        content = (
            "<|start_header_id|>" + message["role"] + "<|end_header_id|>\n\n" + message["content"].strip()
            + "<|eot_id|>"
        )
        if i == 0:
            content = bos_token + content
        out += content
    if add_generation_prompt:
        out += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return out


def study_prompt(conv_mode: str, question: str) -> str:
    """The prompt of ``CustomDataset.__getitem__``: ``<image>\\n`` + question + the instruction, in the
    conversation template, built as ``Conversation.get_prompt`` does (``vicuna_v1``: SeparatorStyle.TWO,
    sep " ", sep2 "</s>"; ``llava_llama_3``: SeparatorStyle.LLAMA_3 = the tokenizer's chat template with
    add_generation_prompt), plus the study's extra " \\n" for llama3-llava-next-8b."""
    qs = DEFAULT_IMAGE_TOKEN + "\n" + question + INSTRUCTION
    if conv_mode == "vicuna_v1":
        roles, seps = ("USER", "ASSISTANT"), [" ", "</s>"]
        messages = [[roles[0], qs], [roles[1], None]]
        ret = VICUNA_V1_SYSTEM + seps[0]
        for i, (role, message) in enumerate(messages):
            if message:
                ret += role + ": " + message + seps[i % 2]
            else:
                ret += role + ":"
        return ret
    if conv_mode == "llava_llama_3":
        roles = ("user", "assistant")
        messages = [[roles[0], qs], [roles[1], None]]
        chat = [{"role": "system", "content": LLAMA3_SYSTEM}]
        for role, message in messages:
            if message:
                chat.append({"role": role, "content": message})
        prompt = _render_llama3_instruct(chat, bos_token=LLAMA3_BOS, add_generation_prompt=True)
        return prompt + " \n"  # InformationFlow.py: `if self.model_name == "llama3-llava-next-8b": prompt+=" \n"`
    raise ValueError(f"unknown conv_mode {conv_mode!r}; one of {CONV_MODES}")


# ------------------------------------------------------------------------------------------ tokens


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """``llava.mm_utils.tokenizer_image_token``, verbatim: each chunk around ``<image>`` tokenised on its own
    (with the tokenizer's special tokens), the BOS of the first chunk kept once, ``-200`` in between."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X), strict=False) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])

    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def expand_image_tokens(ids: Sequence[int], n_features: int, image_token_id: int) -> list[int]:
    """HF layout: the single ``-200`` replaced by ``n_features`` copies of the checkpoint's image token id.
    Position p of the result is position p of the study's ``inputs_embeds``."""
    ids = list(ids)
    if ids.count(IMAGE_TOKEN_INDEX) != 1:
        raise ValueError(
            f"expected exactly one {IMAGE_TOKEN_INDEX} in the study's ids, got {ids.count(IMAGE_TOKEN_INDEX)}"
        )
    at = ids.index(IMAGE_TOKEN_INDEX)
    return ids[:at] + [image_token_id] * n_features + ids[at + 1 :]


def find_token_range(tokenizer, token_array, substring: str, conv_mode: str) -> tuple[int, int]:
    """``InformationFlow.find_token_range``: the tokens' strings joined (SentencePiece "▁" -> " " for the
    Vicuna models; byte-level "Ġ" -> " ", "Ċ" -> "\\n" for llama3-llava-next-8b), the first occurrence of
    `substring`, and the tokens whose accumulated string length covers it."""
    toks = tokenizer.convert_ids_to_tokens([int(t) for t in token_array])
    if conv_mode == "vicuna_v1":
        whole_string = "".join(toks).replace("▁", " ")
    else:
        whole_string = "".join(toks).replace("Ġ", " ").replace("Ċ", "\n")
    char_loc = whole_string.index(substring)
    loc = 0
    tok_start, tok_end = None, None
    for i, t in enumerate(toks):
        loc += len(t)
        if tok_start is None and loc > char_loc:
            tok_start = i
        if tok_end is None and loc >= char_loc + len(substring):
            tok_end = i + 1
            break
    return (tok_start, tok_end)


# ------------------------------------------------------------------------------------------ images (mm_utils)


def expand2square(pil_img, background_color):
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def select_best_resolution(original_size, possible_resolutions):
    """``mm_utils.select_best_resolution``; sizes are (width, height)."""
    original_width, original_height = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")

    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (width, height)
    return best_fit


def resize_and_pad_image(image, target_resolution):
    """``mm_utils.resize_and_pad_image``: PIL's default resample (bicubic), black padding, centred."""
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height = target_height
        new_width = min(math.ceil(original_width * scale_h), target_width)
    resized_image = image.resize((new_width, new_height))
    new_image = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    paste_x = (target_width - new_width) // 2
    paste_y = (target_height - new_height) // 2
    new_image.paste(resized_image, (paste_x, paste_y))
    return new_image


def divide_to_patches(image, patch_size):
    patches = []
    width, height = image.size
    for i in range(0, height, patch_size):
        for j in range(0, width, patch_size):
            box = (j, i, j + patch_size, i + patch_size)
            patches.append(image.crop(box))
    return patches


def _possible_resolutions(grid_pinpoints):
    # HF: the checkpoint config holds a list of pairs (a list, as in the study's configs, so no literal_eval).
    # The study reads each pair as (width, height); HF's config documents (height, width). The study's
    # reading is used; the pinpoint lists of LLaVA-NeXT are symmetric, so both readings give the same set.
    return [tuple(int(v) for v in pair) for pair in grid_pinpoints]


def get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size):
    """``mm_utils.get_anyres_image_grid_shape``: (num_patch_width, num_patch_height) of the crop grid."""
    width, height = select_best_resolution(image_size, _possible_resolutions(grid_pinpoints))
    return width // patch_size, height // patch_size


def unpad_image(tensor, original_size):
    """``llava/model/llava_arch.unpad_image`` verbatim (LLaVA-NeXT): ``original_size`` is PIL's (width, height)
    and the kept height/width is truncated with ``int()`` (HF's copy rounds to 7 decimals first)."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]

    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height

    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        unpadded_tensor = tensor[:, padding : current_height - padding, :]
    else:
        scale_factor = current_height / original_height
        new_width = int(original_width * scale_factor)
        padding = (current_width - new_width) // 2
        unpadded_tensor = tensor[:, :, padding : current_width - padding]
    return unpadded_tensor


def clip_image_processor(path, **overrides):
    """The study's "image_processor" (LLaVA's CLIPVisionTower loads ``CLIPImageProcessor`` of the vision tower):
    PIL resize of the shortest edge (bicubic), centre crop, rescale 1/255, CLIP normalisation.

    HF: the settings come from the checkpoint's saved image processor; transformers 5's PIL backend
    (``CLIPImageProcessorPil``) has the semantics of transformers 4's ``CLIPImageProcessor``. The HF LLaVA
    processors' own extras (llava-hf ``do_pad`` to a square, LLaVA-NeXT tiling) are not used: the study
    does both itself, in ``process_images``.
    """
    import transformers

    saved = transformers.AutoImageProcessor.from_pretrained(str(path))
    size = dict(saved.size) if saved.size is not None else {"shortest_edge": 336}
    if "shortest_edge" not in size:
        size = {"shortest_edge": min(v for v in size.values() if v)}
    crop = (
        dict(saved.crop_size)
        if getattr(saved, "crop_size", None)
        else {"height": size["shortest_edge"], "width": size["shortest_edge"]}
    )
    kwargs = dict(
        do_resize=True,
        size={"shortest_edge": int(size["shortest_edge"])},
        resample=getattr(saved, "resample", None) or 3,
        do_center_crop=True,
        crop_size={"height": int(crop["height"]), "width": int(crop["width"])},
        do_rescale=True,
        rescale_factor=getattr(saved, "rescale_factor", None) or 1 / 255,
        do_normalize=True,
        image_mean=list(saved.image_mean),
        image_std=list(saved.image_std),
        do_convert_rgb=True,
    )
    kwargs.update(overrides)
    return transformers.CLIPImageProcessorPil(**kwargs)


def _preprocess(processor, image) -> torch.Tensor:
    return torch.as_tensor(np.asarray(processor.preprocess(image, return_tensors="np")["pixel_values"][0]))


def process_anyres_image(image, processor, grid_pinpoints):
    """``mm_utils.process_anyres_image``: base = the whole image resized (not padded) to the tower size, then
    the crops of the image resized and padded to the best pinpoint resolution."""
    possible_resolutions = _possible_resolutions(grid_pinpoints)
    best_resolution = select_best_resolution(image.size, possible_resolutions)
    image_padded = resize_and_pad_image(image, best_resolution)
    patches = divide_to_patches(image_padded, processor.crop_size["height"])
    shortest_edge = processor.size["shortest_edge"]
    image_original_resize = image.resize((shortest_edge, shortest_edge))
    image_patches = [image_original_resize] + patches
    image_patches = [_preprocess(processor, image_patch) for image_patch in image_patches]
    return torch.stack(image_patches, dim=0)


def process_images(images, image_processor, image_aspect_ratio: str, grid_pinpoints=None) -> torch.Tensor:
    """``mm_utils.process_images`` for ``image_aspect_ratio`` "pad" (LLaVA-1.5) and "anyres" (LLaVA-NeXT).
    Returns the stacked tensor: [n_images, 3, H, W] ("pad") or [n_images, n_tiles, 3, H, W] ("anyres")."""
    new_images = []
    if image_aspect_ratio == "anyres":
        for image in images:
            new_images.append(process_anyres_image(image, image_processor, grid_pinpoints))
    elif image_aspect_ratio == "pad":
        for image in images:
            image = expand2square(image, tuple(int(x * 255) for x in image_processor.image_mean))
            new_images.append(_preprocess(image_processor, image))
    else:
        raise ValueError(f"image_aspect_ratio {image_aspect_ratio!r} is not one the study's models use")
    return torch.stack(new_images, dim=0)


# ------------------------------------------------------------------------------------------ box mask (utils.py)


def create_mask_with_bbox(image, bboxes):
    """``utils.create_mask_with_bbox``: green image of the same size, each box filled red with ImageDraw."""
    mask = Image.new("RGB", image.size, (0, 255, 0))
    draw = ImageDraw.Draw(mask)
    unique_color = (255, 0, 0)
    for bbox in bboxes:
        draw.rectangle(bbox, fill=unique_color)
    return mask


def prepare_image_patch_bbx(mask_tiles: torch.Tensor, image_size, *, patch_size: int, spatial_unpad: bool,
                            grid_pinpoints=None, vision_image_size: int | None = None) -> torch.Tensor:
    """``utils.prepare_image_patch_bbx`` for one image: the (processed) mask tiles cut into patch_size^2-pixel
    patches in the order of the image features, [n_features, patch_size**2, 3]. For LLaVA-NeXT
    (``spatial_unpad``): base tile first, then the any-res grid permuted, unpadded with LLaVA-NeXT's
    ``unpad_image`` and closed by a column of -1 per row (the ``image_newline`` slots)."""
    concat_images = mask_tiles if mask_tiles.ndim == 4 else mask_tiles.unsqueeze(0)
    _, _, image_w, image_h = concat_images.size()
    assert image_w == image_h
    image_size_px = image_h
    num_batch, channel, _, _ = concat_images.size()
    p = concat_images.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)
    p = p.reshape(num_batch, channel, image_size_px // patch_size, image_size_px // patch_size, patch_size * patch_size)
    p = p.contiguous().view(num_batch, channel, -1, patch_size * patch_size)
    image_pat = p.permute(0, 2, 3, 1).contiguous()  # [tiles, side*side, patch_size**2, 3]

    if spatial_unpad and image_pat.shape[0] > 1:
        base_image_pat = image_pat[0]
        image_pat = image_pat[1:]
        height = width = image_size_px // patch_size  # vision tower num_patches_per_side
        assert height * width == base_image_pat.shape[0]
        num_patch_width, num_patch_height = get_anyres_image_grid_shape(image_size, grid_pinpoints, vision_image_size)
        image_pat = image_pat.view(num_patch_height, num_patch_width, height, width, patch_size * patch_size * channel)
        image_pat = image_pat.permute(4, 0, 2, 1, 3).contiguous()
        image_pat = image_pat.flatten(1, 2).flatten(2, 3)
        image_pat = unpad_image(image_pat, image_size)
        image_pat = torch.cat(
            (
                image_pat,
                (torch.ones([image_pat.size(0)]) * (-1))[:, None, None].expand(*image_pat.shape[:-1], 1).to(
                    image_pat.dtype
                ),
            ),
            dim=-1,
        )
        image_pat = image_pat.flatten(1, 2)
        image_pat = image_pat.permute(1, 0)
        image_pat = image_pat.view(-1, patch_size * patch_size, channel)
        return torch.cat((base_image_pat, image_pat), dim=0)
    return image_pat[0]


@dataclass
class PatchSets:
    """``generate_llava``'s patch sets (indices into the image features)."""

    objects: list[int]  # patches holding at least one exactly-red pixel
    pad: list[int]  # the newline (-1) slots
    original: list[int]  # base tile patches
    hd: list[int]  # everything after the base tile (newline slots included)
    objects_in_hd: list[int]


def patch_sets(patched_mask: torch.Tensor, patch_size: int, tile_px: int) -> PatchSets:
    patched_mask = np.array(patched_mask.cpu())
    target_object = np.array([255, 0, 0], dtype=np.uint8)
    match_object = np.all(patched_mask == target_object, axis=-1)
    objects_indices = np.where(np.any(match_object, axis=1))[0]
    target_pad = np.array([-1, -1, -1], dtype=np.int8)
    match_pad = np.all(patched_mask == target_pad, axis=-1)
    pad_indices = np.where(np.any(match_pad, axis=1))[0]
    original_patch_number = (tile_px // patch_size) ** 2
    original_patch_indices = list(range(patched_mask.shape[0]))[0:original_patch_number]
    hd_patch_indice = list(range(patched_mask.shape[0]))[original_patch_number:]
    objects_indices_in_hd = objects_indices[objects_indices >= original_patch_number]
    return PatchSets(
        objects=[int(i) for i in objects_indices],
        pad=[int(i) for i in pad_indices],
        original=original_patch_indices,
        hd=hd_patch_indice,
        objects_in_hd=[int(i) for i in objects_indices_in_hd],
    )


# ------------------------------------------------------------------------------------------ model


@dataclass
class StudyModel:
    """An HF LLaVA / LLaVA-NeXT checkpoint seen as the study's LLaVA(-NeXT) model."""

    path: str
    hf: Any
    tokenizer: Any
    image_processor: Any
    conv_mode: str
    kind: str  # "llava" (LLaVA-1.5: pad, flat) or "llava_next" (anyres, spatial_unpad)
    image_token_id: int
    patch_size: int
    tile_px: int  # vision tower image size
    grid_pinpoints: Any
    vision_feature_layer: Any
    select_strategy: str

    @property
    def n_layers(self) -> int:
        return self.hf.config.text_config.num_hidden_layers

    @property
    def n_vocab(self) -> int:
        """The original model's vocabulary: llava-hf pads the LM vocabulary after adding ``<image>``
        (32000 -> 32064, 128256 -> 128320); the study's models have only the rows below the image token."""
        return int(self.image_token_id)

    @property
    def aspect_ratio(self) -> str:
        return "anyres" if self.kind == "llava_next" else "pad"

    @property
    def side(self) -> int:
        return self.tile_px // self.patch_size

    def language_model(self):
        return self.hf.model.language_model

    def layers(self):
        return self.language_model().layers


def detect_conv_mode(tokenizer) -> str:
    return "llava_llama_3" if tokenizer.bos_token == LLAMA3_BOS else "vicuna_v1"


def load_study_model(path, conv_mode: str | None = None) -> StudyModel:
    import transformers

    path = str(path)
    config = transformers.AutoConfig.from_pretrained(path)
    if config.model_type == "llava":
        cls = transformers.LlavaForConditionalGeneration
    elif config.model_type == "llava_next":
        cls = transformers.LlavaNextForConditionalGeneration
    else:
        raise ValueError(f"{path}: model_type {config.model_type!r} is neither llava nor llava_next")
    hf = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = config.image_token_index
    vc = config.vision_config
    return StudyModel(
        path=path,
        hf=hf,
        tokenizer=tokenizer,
        image_processor=clip_image_processor(path),
        conv_mode=conv_mode or detect_conv_mode(tokenizer),
        kind=config.model_type,
        image_token_id=int(image_token_id),
        patch_size=int(vc.patch_size),
        tile_px=int(vc.image_size),
        grid_pinpoints=getattr(config, "image_grid_pinpoints", None),
        vision_feature_layer=config.vision_feature_layer,
        select_strategy=config.vision_feature_select_strategy,
    )


def n_image_features(sm: StudyModel, image_size) -> int:
    """Number of image features the study's model puts in place of ``<image>`` (its ``image_dim``)."""
    per_tile = sm.side * sm.side + (1 if sm.select_strategy == "full" else 0)
    if sm.kind == "llava":
        return per_tile
    npw, nph = get_anyres_image_grid_shape(image_size, sm.grid_pinpoints, sm.tile_px)
    grid = torch.empty(1, nph * sm.side, npw * sm.side)
    h, w = unpad_image(grid, image_size).shape[1:]
    return per_tile + h * (w + 1)


@torch.no_grad()
def image_features(sm: StudyModel, pixel_values: torch.Tensor, image_size) -> torch.Tensor:
    """``encode_images`` + the feature packing of ``prepare_inputs_labels_for_multimodal`` for one image:
    [image_dim, d_model]. Vision tower hidden state ``mm_vision_select_layer`` (HF: vision_feature_layer),
    CLS dropped ("patch" = HF "default"), projector; LLaVA-NeXT ``spatial_unpad``: base features, then the
    crop grid permuted, unpadded with LLaVA-NeXT's ``unpad_image``, one ``image_newline`` per row."""
    model = sm.hf.model
    tiles = pixel_values.reshape(-1, *pixel_values.shape[-3:]).to(torch.float32)
    out = model.vision_tower(tiles, output_hidden_states=True)
    layer = sm.vision_feature_layer
    if isinstance(layer, int):
        feats = out.hidden_states[layer]
    else:
        feats = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
    if sm.select_strategy == "default":
        feats = feats[:, 1:]
    feats = model.multi_modal_projector(feats)  # [tiles, side*side, d]
    if sm.kind == "llava":
        return feats.flatten(0, 1)
    base_image_feature = feats[0]
    image_feature = feats[1:]
    height = width = sm.side
    assert height * width == base_image_feature.shape[0]
    num_patch_width, num_patch_height = get_anyres_image_grid_shape(image_size, sm.grid_pinpoints, sm.tile_px)
    image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
    image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous()
    image_feature = image_feature.flatten(1, 2).flatten(2, 3)
    image_feature = unpad_image(image_feature, image_size)
    newline = model.image_newline
    image_feature = torch.cat(
        (image_feature, newline[:, None, None].expand(*image_feature.shape[:-1], 1).to(image_feature.dtype)), dim=-1
    )
    image_feature = image_feature.flatten(1, 2).transpose(0, 1)
    return torch.cat((base_image_feature, image_feature), dim=0)


# ------------------------------------------------------------------------------------------ one sample


@dataclass
class StudyInput:
    prompt: str
    study_ids: list[int]  # with the single -200
    input_ids: torch.Tensor  # [1, pos], HF layout
    pixel_values: torch.Tensor  # [1, 3, H, W] or [1, tiles, 3, H, W]
    image_size: tuple[int, int]  # PIL (width, height)
    image_dim: int
    image_index: int  # position of the first image feature
    regions: dict[str, list[int]] = field(default_factory=dict)
    patches: PatchSets | None = None
    patched_mask: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


def _noim_chunks(study_ids: list[int]) -> list[list[int]]:
    image_token_indices = [-1] + [i for i, t in enumerate(study_ids) if t == IMAGE_TOKEN_INDEX] + [len(study_ids)]
    return [
        study_ids[image_token_indices[i] + 1 : image_token_indices[i + 1]] for i in range(len(image_token_indices) - 1)
    ]


def text_range(sm: StudyModel, study_ids: list[int], image_dim: int, text: str) -> list[int]:
    """``blockdesc2range`` for a text span: found in the tokens after the image, shifted to absolute positions
    (``+ len(chunk before the image) + 1 + image_dim - 1``)."""
    noim = _noim_chunks(study_ids)
    r = find_token_range(sm.tokenizer, noim[1], text, sm.conv_mode)
    return list(range(r[0] + len(noim[0]) + 1 + image_dim - 1, r[1] + len(noim[0]) + 1 + image_dim - 1))


def study_regions(sm: StudyModel, study_ids: list[int], image_dim: int, question: str,
                  true_option: str | None = None, false_option: str | None = None,
                  central_object: str | None = None) -> dict[str, list[int]]:
    """``blockdesc2range``: Last, Question, Image and the spans given, in positions of the expanded sequence."""
    n_ids = len(study_ids)
    image_index = study_ids.index(IMAGE_TOKEN_INDEX)
    regions = {
        "Last": [n_ids + image_dim - 1 - 1],  # ntoks - 1, ntoks = input_ids.shape[1] + image_dim - 1
        "Question": text_range(sm, study_ids, image_dim, question),
        "Image": list(range(image_index, image_index + image_dim)),
    }
    if true_option is not None:
        regions["True Option"] = text_range(sm, study_ids, image_dim, true_option)
    if false_option is not None:
        regions["False Option"] = text_range(sm, study_ids, image_dim, false_option)
    if central_object is not None:
        regions["Central Object"] = text_range(sm, study_ids, image_dim, central_object)
    if true_option is not None and false_option is not None:
        options = regions["True Option"] + regions["False Option"]
        regions["Question without Options"] = [p for p in regions["Question"] if p not in options]
    return regions


def patch_regions(sets: PatchSets, image_dim: int, image_index: int) -> dict[str, list[int]]:
    """``blockdesc2range_patches`` (sorted; the study builds some of them from Python sets)."""
    other = set(range(image_dim)) - set(sets.objects) - set(sets.pad)
    other_hd = set(sets.hd) - set(sets.objects_in_hd)
    shift = lambda idx: sorted(int(i) + image_index for i in idx)  # noqa: E731
    return {
        "Image Central Object": shift(sets.objects),
        "Image Without Central Object": shift(other),
        "Image Pad": shift(sets.pad),
        "Image Original Patch": shift(sets.original),
        "Image HD Patch Indice": shift(sets.hd),
        "Image Central Object in HD Patch Indice": shift(sets.objects_in_hd),
        "Image HD Patch Without Central Object Indice": shift(other_hd),
    }


def mask_processor(sm: StudyModel):
    """``CustomDataset.image_processor_mask``: a copy with do_normalize = do_rescale = False."""
    proc = copy.deepcopy(sm.image_processor)
    proc.do_normalize = False
    proc.do_rescale = False
    return proc


def box_patches(sm: StudyModel, image, boxes) -> tuple[PatchSets, torch.Tensor]:
    """The study's related-patch rule for boxes (x0, y0, x1, y1) drawn with ImageDraw.rectangle."""
    mask = create_mask_with_bbox(image, boxes)
    mask_tensor = process_images([mask], mask_processor(sm), sm.aspect_ratio, sm.grid_pinpoints)[0]
    patched = prepare_image_patch_bbx(
        mask_tensor.to(torch.float32), image.size, patch_size=sm.patch_size, spatial_unpad=sm.kind == "llava_next",
        grid_pinpoints=sm.grid_pinpoints, vision_image_size=sm.tile_px,
    )
    return patch_sets(patched, sm.patch_size, sm.tile_px), patched


def prepare(sm: StudyModel, image, question: str, true_option: str | None = None, false_option: str | None = None,
            central_object: str | None = None, boxes=None) -> StudyInput:
    image = image.convert("RGB")
    prompt = study_prompt(sm.conv_mode, question)
    study_ids = tokenizer_image_token(prompt, sm.tokenizer)
    pixel_values = process_images([image], sm.image_processor, sm.aspect_ratio, sm.grid_pinpoints)
    image_dim = n_image_features(sm, image.size)
    ids = expand_image_tokens(study_ids, image_dim, sm.image_token_id)
    inp = StudyInput(
        prompt=prompt,
        study_ids=study_ids,
        input_ids=torch.tensor([ids], dtype=torch.long),
        pixel_values=pixel_values,
        image_size=tuple(image.size),
        image_dim=image_dim,
        image_index=study_ids.index(IMAGE_TOKEN_INDEX),
    )
    inp.regions = study_regions(sm, study_ids, image_dim, question, true_option, false_option, central_object)
    if boxes:
        sets, patched = box_patches(sm, image, boxes)
        if patched.shape[0] != image_dim:
            raise AssertionError(f"mask patches {patched.shape[0]} != image features {image_dim}")
        inp.patches, inp.patched_mask = sets, patched
        inp.regions.update(patch_regions(sets, image_dim, inp.image_index))
    return inp


# ------------------------------------------------------------------------------------------ forward passes


@torch.no_grad()
def inputs_embeds(sm: StudyModel, inp: StudyInput) -> torch.Tensor:
    """The study's ``inputs_embeds``: text embeddings with the image features in place of ``<image>``."""
    embed = sm.language_model().get_input_embeddings()
    emb = embed(inp.input_ids).clone()
    feats = image_features(sm, inp.pixel_values[0], inp.image_size)
    if feats.shape[0] != inp.image_dim:
        raise AssertionError(f"{feats.shape[0]} image features, expected {inp.image_dim}")
    emb[0, inp.image_index : inp.image_index + inp.image_dim] = feats.to(emb.dtype)
    return emb


def _block_mask(q_length: int, num_tokens: int, from_to_index, dtype) -> torch.Tensor:
    """``set_block_attn_hooks_llava``'s mask for a prompt pass: lower-triangular ones, the blocked
    (target row, source column) entries zeroed, then additive: (1 - m) * finfo.min."""
    attn_mask = torch.tril(torch.ones((q_length, num_tokens), dtype=torch.uint8))
    if from_to_index:
        rows, cols = zip(*from_to_index, strict=False)
        attn_mask[list(rows), list(cols)] = 0
    attn_mask = attn_mask.repeat(1, 1, 1, 1).to(dtype=dtype)
    return (1.0 - attn_mask) * torch.finfo(dtype).min


class _BlockAttention:
    """Wraps ``self_attn.forward`` of the given layers, replacing ``attention_mask`` (``methods.py``)."""

    def __init__(self, sm: StudyModel, from_to_index_per_layer: dict[int, list[tuple[int, int]]]):
        self.sm = sm
        self.config = from_to_index_per_layer
        self.saved: list[tuple[int, Any]] = []

    def __enter__(self):
        layers = self.sm.layers()
        dtype = next(self.sm.hf.parameters()).dtype
        for i, pairs in self.config.items():
            attn = layers[i].self_attn
            original = attn.forward

            def wrapper(*args, _fwd=original, _pairs=pairs, **kwargs):
                hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                q_length = hidden_states.shape[1]
                if q_length == 1:
                    raise AssertionError("the study's knockout runs only the prompt pass (max_new_tokens=1)")
                num_tokens = q_length  # position_ids[0][-1] + 1 of a prompt pass without cache
                kwargs["attention_mask"] = _block_mask(q_length, num_tokens, _pairs, dtype).to(hidden_states.device)
                return _fwd(*args, **kwargs)

            attn.forward = wrapper
            self.saved.append((i, original))
        return self

    def __exit__(self, *exc):
        layers = self.sm.layers()
        for i, original in reversed(self.saved):
            attn = layers[i].self_attn
            if (
                getattr(original, "__self__", None) is attn
                and getattr(original, "__func__", None) is type(attn).forward
            ):
                del attn.forward  # back to the class method
            else:
                attn.forward = original
        self.saved.clear()


@torch.no_grad()
def last_logits(sm: StudyModel, inp: StudyInput, block_config: dict | None = None) -> torch.Tensor:
    """Logits at the last position of one prompt pass (optionally with blocked attention), full LM vocab."""
    emb = inputs_embeds(sm, inp)
    lm = sm.language_model()
    if block_config:
        with _BlockAttention(sm, block_config):
            out = lm(inputs_embeds=emb, use_cache=False)
    else:
        out = lm(inputs_embeds=emb, use_cache=False)
    return sm.hf.lm_head(out.last_hidden_state[:, -1])[0].float()


def vocab_probs(sm: StudyModel, logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits[..., : sm.n_vocab].float(), dim=-1)


@dataclass
class GreedyAnswer:
    text: str  # decoded with skip_special_tokens, .strip().lower()
    first_token: int
    first_prob: float
    token_ids: list[int]


def eos_ids(sm: StudyModel) -> set[int]:
    """HF generate stops at the generation config's eos_token_id (the study passes no stopping criteria)."""
    eos = getattr(sm.hf.generation_config, "eos_token_id", None)
    if eos is None:
        eos = sm.hf.config.text_config.eos_token_id
    eos = eos if isinstance(eos, (list, tuple, set)) else [eos]
    return {int(e) for e in eos if e is not None}


@torch.no_grad()
def greedy_answer(sm: StudyModel, inp: StudyInput, max_new_tokens: int = 128) -> GreedyAnswer:
    """``run_original``: greedy decoding (temperature 0, num_beams 1) up to ``max_new_tokens`` or EOS; the
    answer is ``batch_decode(..., skip_special_tokens=True)[0].strip().lower()``; base score =
    softmax(first step logits)[first token]. HF: argmax and softmax over the original vocabulary rows."""
    lm = sm.language_model()
    emb = inputs_embeds(sm, inp)
    out = lm(inputs_embeds=emb, use_cache=True)
    cache = out.past_key_values
    logits = sm.hf.lm_head(out.last_hidden_state[:, -1])[0]
    probs = vocab_probs(sm, logits)
    first = int(logits[: sm.n_vocab].argmax())
    first_prob = float(probs[first])
    eos = eos_ids(sm)
    generated = [first]
    token = first
    embed = lm.get_input_embeddings()
    while len(generated) < max_new_tokens and token not in eos:
        step = embed(torch.tensor([[token]]))
        out = lm(inputs_embeds=step, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = int(sm.hf.lm_head(out.last_hidden_state[:, -1])[0, : sm.n_vocab].argmax())
        generated.append(token)
    text = sm.tokenizer.batch_decode([generated], skip_special_tokens=True)[0].strip().lower()
    return GreedyAnswer(text=text, first_token=first, first_prob=first_prob, token_ids=generated)


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """InformationFlow.py: ``range(max(0, layer - window // 2), min(L, layer - (-window // 2)))``."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def block_positions(inp: StudyInput, block: str) -> tuple[list[int], list[int]]:
    """(source positions, target positions) of "Source->Target" in the study's region names."""
    src, dst = (s.strip() for s in block.split("->"))
    return list(inp.regions[src]), list(inp.regions[dst])


@torch.no_grad()
def knockout_prob(sm: StudyModel, inp: StudyInput, block: str, layer: int, window: int, token: int) -> float:
    """``trace_with_attn_block_llava``: every (target, source) pair of the block blocked in the window's layers."""
    sources, targets = block_positions(inp, block)
    pairs = [(stok1, stok0) for stok0 in sources for stok1 in targets]
    config = {lay: list(pairs) for lay in window_layers(layer, window, sm.n_layers)}
    return float(vocab_probs(sm, last_logits(sm, inp, config))[token])


def knockout_sweep(sm: StudyModel, inp: StudyInput, block: str, window: int, layers: Sequence[int] | None = None,
                   greedy: GreedyAnswer | None = None) -> list[dict[str, Any]]:
    greedy = greedy or greedy_answer(sm, inp)
    rows = []
    for layer in layers if layers is not None else range(sm.n_layers):
        new = knockout_prob(sm, inp, block, layer, window, greedy.first_token)
        base = greedy.first_prob
        rows.append({"block": block, "layer": layer, "base_prob": base, "knockout_prob": new,
                     "relative_change_pct": (new - base) * 100.0 / base})
    return rows


# ------------------------------------------------------------------------------------------ lens


@torch.no_grad()
def last_hidden_states(sm: StudyModel, inp: StudyInput) -> list[torch.Tensor]:
    """``output_hidden_states`` of the prompt pass as the study's transformers (4.40) LlamaModel returns them:
    L + 1 entries, entry l < L = the input of decoder layer l (0 = embeddings), entry L = the final norm's
    output; last position only."""
    lm = sm.language_model()
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def pre(i):
        def hook(module, args, kwargs):
            hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[i] = hs[0, -1].detach().clone()
        return hook

    for i, layer in enumerate(lm.layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))

    def norm_hook(module, args, output):
        captured[len(lm.layers)] = output[0, -1].detach().clone()

    handles.append(lm.norm.register_forward_hook(norm_hook))
    try:
        lm(inputs_embeds=inputs_embeds(sm, inp), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in range(len(lm.layers) + 1)]


def word_token(tokenizer, word: str) -> int:
    """``tokenizer.encode(word, add_special_tokens=False)[0]``."""
    return int(tokenizer.encode(word, add_special_tokens=False)[0])


@torch.no_grad()
def lens(sm: StudyModel, inp: StudyInput, words: dict[str, str]) -> list[dict[str, Any]]:
    """``last_position_answer_prob.py``: per layer l in 0..L, softmax(h_l @ E.T)[token of word], E = the output
    embeddings (float32), no final norm applied to l < L. HF: softmax over the original vocabulary rows."""
    E = sm.hf.get_output_embeddings().weight.to(torch.float32)[: sm.n_vocab]
    tokens = {form: word_token(sm.tokenizer, w) for form, w in words.items()}
    rows = []
    for layer, hs in enumerate(last_hidden_states(sm, inp)):
        scores = torch.softmax(hs.to(torch.float32).matmul(E.T), dim=-1)
        for form, tok in tokens.items():
            rows.append({"layer": layer, "form": form, "prob": float(scores[tok])})
    return rows


def study_word_forms(answer: str, false_option: str | None = None) -> dict[str, str]:
    """The words the study tracks: answer (and false option) as given, lower case, and ``.capitalize()``."""
    forms = {"answer_lower": answer.lower(), "answer_capitalized": answer.lower().capitalize()}
    if false_option is not None:
        forms["false_option_lower"] = false_option
        forms["false_option_capitalized"] = false_option.capitalize()
    return forms
