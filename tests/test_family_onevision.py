"""LLaVA-OneVision (``llava_onevision``) on a tiny random checkpoint: knockout vs the oracle, image positions
(token counts of the processor vs the model's packing over several grids, the shrunk grid too), related patches
by painting across tiles, the flow CLI, the live-knockout proof."""

from __future__ import annotations

import pytest

from family_checks import check_flow_cli, check_image_positions, check_knockout_oracle, check_related_by_painting
from family_tokenizers import saved_tokenizer
from oracle import plain_model

TILE, PATCH = 32, 8
SIDE = TILE // PATCH
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_onevision_path(tmp_path_factory):
    import json

    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from mm_lens.families.onevision import onevision_processor

    path = tmp_path_factory.mktemp("tiny-onevision")
    tokenizer = saved_tokenizer("qwen3", path, add=["<image>", "<video>"])
    tokenizer.chat_template = TEMPLATE
    vision = SiglipVisionConfig(image_size=TILE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  vision_aspect_ratio="anyres_max_9")
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():  # a random tiny model's image features must reach the answer
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(path)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    image_processor = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE},
                                                      image_grid_pinpoints=PINPOINTS)
    image_processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": SIDE * SIDE,
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}))
    onevision_processor(str(path))  # loads without torchvision
    return path


@pytest.fixture(scope="module")
def tiny_onevision(tiny_onevision_path):
    from mm_lens.model import load

    return load(str(tiny_onevision_path))


def test_knockout_equals_the_oracle(tiny_onevision, tiny_onevision_path, make_image):
    from mm_lens.inputs import prepare

    plain = plain_model(str(tiny_onevision_path))
    inp = prepare(tiny_onevision, make_image(40, 24), "Is the cube red or blue ?", protocol="checkpoint",
                  spans={"True Option": "red"})
    worst = check_knockout_oracle(tiny_onevision, plain, inp, ["Image->Question", "Question->Last", "Image->Last",
                                                               "Image Markers->Last"], [range(0, 2), range(2, 4)])
    print("onevision oracle", worst)
    assert worst["moved"] > 1e-3


@pytest.mark.parametrize("size", [(40, 24), (24, 56), (64, 64), (30, 30), (90, 40)])
def test_image_positions_and_markers(tiny_onevision, make_image, size):
    from mm_lens.inputs import prepare

    model = tiny_onevision
    inp = prepare(model, make_image(*size), "What is this ?", protocol="checkpoint")
    check_image_positions(model, inp)
    assert "batch_num_images" in inp.extra and inp.image_sizes is not None
    assert model.processor.vision_aspect_ratio == "anyres_max_9" and model.processor.num_image_tokens == SIDE * SIDE
    codes = list(inp.regions.image_tokens)
    # The base tile first, row-major, with no separator after it.
    assert [(c.tile, c.row, c.col) for c in codes[:SIDE * SIDE]] == [(0, r, c) for r in range(SIDE)
                                                                      for c in range(SIDE)]
    rest = codes[SIDE * SIDE:]
    assert rest and not rest[0].is_newline and rest[-1].is_newline
    # Every row of the any-res grid is closed by one image_newline, and the rows have equal width.
    lines = [i for i, c in enumerate(rest) if c.is_newline]
    width = lines[0]
    assert lines == [r * (width + 1) + width for r in range(len(lines))]
    assert all(c.tile >= 1 and c.box is not None for c in rest if not c.is_newline)
    assert [(c.grid_row, c.grid_col) for c in rest if not c.is_newline] == [
        (r, c) for r in range(len(lines)) for c in range(width)]
    assert inp.regions.positions("Image Markers") == []  # OneVision has no marker tokens: separators are features


def test_token_counts_match_the_packing_when_the_grid_is_shrunk(tiny_onevision, make_image):
    """Above ``anyres_max_N`` the model shrinks the grid; the processor's count and the layout follow it, and each
    shrunk feature names its nearest source patch."""
    from mm_lens.families.onevision import onevision_codes

    model = tiny_onevision
    processor = model.processor
    config = model.config
    saved = (config.vision_aspect_ratio, processor.vision_aspect_ratio)
    try:
        config.vision_aspect_ratio = processor.vision_aspect_ratio = "anyres_max_1"
        out = processor(images=[make_image(64, 64)], text="<image>", return_tensors="pt")
        codes = onevision_codes(model, out)
        n = int((out["input_ids"] == processor.image_token_id).sum())
        assert len(codes) == n == SIDE * SIDE + SIDE * (SIDE + 1)  # 8x8 crops shrunk to 4x4, plus separators
        rest = [c for c in codes[SIDE * SIDE:] if not c.is_newline]
        assert {c.tile for c in rest} == {1, 2, 3, 4}  # the nearest sources spread over the four crops
        assert [(c.grid_row, c.grid_col) for c in rest] == [(r, c) for r in range(SIDE) for c in range(SIDE)]
        # The model's own forward agrees on the count.
        import torch

        with torch.no_grad():
            feats = model.hf_model.model.get_image_features(out["pixel_values"], out["image_sizes"],
                                                             vision_feature_select_strategy="full",
                                                             vision_aspect_ratio="anyres_max_1")
        got = feats.pooler_output if hasattr(feats, "pooler_output") else feats[0]
        assert sum(f.shape[0] for f in got) == n
    finally:
        config.vision_aspect_ratio, processor.vision_aspect_ratio = saved


def test_related_patches_by_painting(tiny_onevision, make_image):
    check_related_by_painting(tiny_onevision, make_image(40, 24), [(4, 4, 10, 8), (20, 2, 18, 20), (0, 0, 40, 6)])
    check_related_by_painting(tiny_onevision, make_image(24, 56), [(2, 30, 6, 20), (0, 0, 24, 10), (10, 10, 4, 4)])
    check_related_by_painting(tiny_onevision, make_image(64, 64), [(10, 5, 30, 12), (28, 28, 10, 10)])


def test_flow_cli(tiny_onevision_path, tmp_path, make_image):
    table = check_flow_cli(tiny_onevision_path, tmp_path, make_image, [(40, 24), (24, 56), (64, 64)])
    assert set(table["question_id"]) == {"q0", "q1", "q2"}


def test_knockout_is_proved_live_at_load(tiny_onevision):
    assert tiny_onevision.self_checks["knockout_live"] > 0
    assert tiny_onevision.family.name == "onevision"
