"""InternVL 3 (``internvl``) on a tiny random checkpoint: knockout vs the oracle, image positions and markers over
1, 2 and more tiles, related patches by painting (across tiles), the flow CLI, the live-knockout proof."""

from __future__ import annotations

import json

import pytest

from family_checks import check_flow_cli, check_image_positions, check_knockout_oracle, check_related_by_painting
from family_tokenizers import saved_tokenizer
from oracle import plain_model

TILE, PATCH, MAX_TILES = 32, 8, 6
PER_TILE = (TILE // PATCH // 2) ** 2  # 4 features per tile after the 0.5 pixel shuffle
SPECIAL = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
           "video_token": "<video>"}
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_internvl_path(tmp_path_factory):
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    path = tmp_path_factory.mktemp("tiny-internvl")
    tokenizer = saved_tokenizer("qwen3", path, add=list(SPECIAL.values()), extra_special_tokens=SPECIAL)
    tokenizer.chat_template = TEMPLATE
    vision = InternVLVisionConfig(image_size=TILE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5, vision_feature_layer=-1,
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # a random tiny model's image features must reach the answer
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(path)
    image_processor = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True,
                                               min_patches=1, max_patches=MAX_TILES)
    image_processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLProcessor",
                                                            "image_seq_length": PER_TILE}))
    return path


@pytest.fixture(scope="module")
def tiny_internvl(tiny_internvl_path):
    from mm_lens.model import load

    return load(str(tiny_internvl_path))


def test_layout_read_off_pixel_shuffle(tiny_internvl):
    from mm_lens.families.internvl import tile_codes

    codes = tile_codes(tiny_internvl)
    cell = 2 * PATCH
    assert sorted((r, c) for r, c, _ in codes) == [(r, c) for r in range(2) for c in range(2)]
    for r, c, box in codes:
        assert box == (c * cell, r * cell, (c + 1) * cell, (r + 1) * cell)


def test_knockout_equals_the_oracle(tiny_internvl, tiny_internvl_path, make_image):
    from mm_lens.inputs import prepare

    plain = plain_model(str(tiny_internvl_path))
    inp = prepare(tiny_internvl, make_image(64, 32), "Is the cube red or blue ?", protocol="checkpoint",
                  spans={"True Option": "red"})
    assert inp.pixel_values.shape[0] == 3  # 2 tiles + the thumbnail
    worst = check_knockout_oracle(tiny_internvl, plain, inp, ["Image->Question", "Question->Last", "Image->Last",
                                                              "Image Markers->Last"], [range(0, 2), range(1, 3)])
    print("internvl oracle", worst)
    assert worst["moved"] > 1e-3


@pytest.mark.parametrize(("size", "tiles"), [((32, 32), 1), ((64, 32), 3), ((32, 96), 4), ((96, 64), 7)])
def test_image_positions_and_markers(tiny_internvl, make_image, size, tiles):
    from mm_lens.inputs import prepare

    model = tiny_internvl
    inp = prepare(model, make_image(*size), "What is this ?", protocol="checkpoint")
    check_image_positions(model, inp)
    assert inp.pixel_values.shape[0] == tiles
    ids = inp.input_ids[0].tolist()
    tok = model.tokenizer.convert_tokens_to_ids
    image = inp.regions.positions("Image")
    assert len(image) == PER_TILE * tiles and image == list(range(image[0], image[0] + len(image)))
    assert ids[image[0] - 1] == tok("<img>") and ids[image[-1] + 1] == tok("</img>")
    assert inp.regions.positions("Image Markers") == [image[0] - 1, image[-1] + 1]
    codes = list(inp.regions.image_tokens)
    assert [c.tile for c in codes] == [t for t in range(tiles) for _ in range(PER_TILE)]
    base = inp.regions.positions("Base Image")
    assert base == image[-PER_TILE:]  # the thumbnail (the only tile when there is one)
    assert inp.regions.positions("HD Image") == image[:-PER_TILE]


def test_related_patches_by_painting(tiny_internvl, make_image):
    check_related_by_painting(tiny_internvl, make_image(32, 32), [(4, 4, 10, 8), (16, 2, 14, 20), (0, 0, 32, 6)])
    check_related_by_painting(tiny_internvl, make_image(64, 32), [(4, 4, 10, 8), (20, 2, 30, 20), (0, 0, 64, 6)])
    check_related_by_painting(tiny_internvl, make_image(96, 64), [(10, 5, 30, 12), (60, 30, 30, 28), (40, 20, 4, 4)])
    check_related_by_painting(tiny_internvl, make_image(40, 100), [(2, 30, 6, 20), (0, 0, 40, 10)])


def test_flow_cli(tiny_internvl_path, tmp_path, make_image):
    table = check_flow_cli(tiny_internvl_path, tmp_path, make_image, [(32, 32), (64, 32), (40, 100)])
    assert set(table["question_id"]) == {"q0", "q1", "q2"}


def test_knockout_is_proved_live_at_load(tiny_internvl):
    assert tiny_internvl.self_checks["knockout_live"] > 0
    assert tiny_internvl.family.name == "internvl"
