"""Helpers shared by test modules: the one tiny-LLaVA builder (conftest's toy vocabulary and the study models' real
tokenizers both go through it) and the run helpers several test modules use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def text_config(vocab_size: int, pad_id: int, bos_id: int = 1, eos_id: int = 2, kv_heads: int = 4,
                max_positions: int = 512, initializer_range: float = 0.1, **extra: Any):
    """The tiny Llama language model of every test checkpoint: 4 layers, d_model 64, 4 heads."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        initializer_range=initializer_range,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
        **extra,
    )


def vision_config(image_size: int, patch_size: int, **extra: Any):
    """The tiny CLIP vision tower of every test checkpoint: 2 layers, width 32."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
        **extra,
    )


def save_tiny_llava(out_dir: Path, model_type: str, tokenizer: Any, text: Any, vision: Any, image_processor: Any,
                    chat_template: str, grid_pinpoints: list | None = None, seed: int = 0,
                    generation: dict[str, int] | None = None, image_token_id: int | None = None,
                    **config_extra: Any) -> Path:
    """Save a random ``llava`` / ``llava_next`` model and its processor to `out_dir` with ``save_pretrained``.

    `tokenizer` must already be a saved-and-reloaded one (an in-memory fast tokenizer breaks the bridge).
    """
    import torch
    import transformers as tf

    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>") if image_token_id is None else image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        **config_extra,
    )
    torch.manual_seed(seed)
    if model_type == "llava":
        model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(**common))
        processor_cls = tf.LlavaProcessor
    elif model_type == "llava_next":
        model = tf.LlavaNextForConditionalGeneration(tf.LlavaNextConfig(image_grid_pinpoints=grid_pinpoints, **common))
        processor_cls = tf.LlavaNextProcessor
    else:
        raise ValueError(f"unknown model type {model_type!r}")
    for key, value in (generation or {}).items():
        setattr(model.generation_config, key, value)
    model.eval()
    model.save_pretrained(out_dir)
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )
    processor.save_pretrained(out_dir)
    return Path(out_dir)
