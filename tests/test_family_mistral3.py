"""Mistral 3 / Pixtral (``mistral3``) on a tiny random checkpoint: knockout vs the oracle, image positions and
markers, related patches by painting over several aspect ratios, the flow CLI, the live-knockout proof."""

from __future__ import annotations

import pytest

from family_checks import check_flow_cli, check_image_positions, check_knockout_oracle, check_related_by_painting
from family_tokenizers import saved_tokenizer
from oracle import plain_model

PATCH, MERGE, LONGEST = 8, 2, 64
CELL = PATCH * MERGE
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}[IMG]{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}[/INST]{% else %}{{ message['content'][0]['text'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def tiny_mistral3_path(tmp_path_factory):
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from mm_lens.families.mistral3 import pixtral_processor_class

    path = tmp_path_factory.mktemp("tiny-mistral3")
    tokenizer = saved_tokenizer("llama3_1", path, add=["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    tokenizer.chat_template = TEMPLATE
    vision = PixtralVisionConfig(image_size=LONGEST, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, head_dim=16)
    text = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None,
                         max_position_embeddings=512)
    config = Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=MERGE,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1)
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # a random tiny model's image features must reach the answer
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(path)
    image_processor = PixtralImageProcessorPil(size={"longest_edge": LONGEST}, patch_size={"height": PATCH,
                                                                                           "width": PATCH})
    processor = pixtral_processor_class()(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                 spatial_merge_size=MERGE, chat_template=TEMPLATE)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_mistral3(tiny_mistral3_path):
    from mm_lens.model import load

    return load(str(tiny_mistral3_path))


def test_knockout_equals_the_oracle(tiny_mistral3, tiny_mistral3_path, make_image):
    from mm_lens.inputs import prepare

    plain = plain_model(str(tiny_mistral3_path))
    inp = prepare(tiny_mistral3, make_image(40, 24), "Is the cube red or blue ?", protocol="checkpoint",
                  spans={"True Option": "red"})
    worst = check_knockout_oracle(tiny_mistral3, plain, inp, ["Image->Question", "Question->Last", "Image->Last",
                                                              "Image Markers->Last"], [range(0, 2), range(2, 4)])
    print("mistral3 oracle", worst)
    assert worst["moved"] > 1e-3


@pytest.mark.parametrize("size", [(40, 24), (24, 56), (64, 64)])
def test_image_positions_and_markers(tiny_mistral3, make_image, size):
    from mm_lens.inputs import prepare

    model = tiny_mistral3
    inp = prepare(model, make_image(*size), "What is this ?", protocol="checkpoint")
    check_image_positions(model, inp)
    h, w = (int(v) for v in inp.image_sizes.reshape(-1)[:2].tolist())
    assert h % CELL == 0 and w % CELL == 0 and max(h, w) <= LONGEST
    rows, cols = h // CELL, w // CELL
    ids = inp.input_ids[0].tolist()
    tok = model.tokenizer.convert_tokens_to_ids
    image = inp.regions.positions("Image")
    assert len(image) == rows * cols
    # The block: rows of [IMG] x cols, each closed by [IMG_BREAK], the last by [IMG_END].
    first = image[0]
    block = ids[first:first + rows * (cols + 1)]
    want = ([tok("[IMG]")] * cols + [tok("[IMG_BREAK]")]) * rows
    want[-1] = tok("[IMG_END]")
    assert block == want
    markers = inp.regions.positions("Image Markers")
    assert markers == [first + r * (cols + 1) + cols for r in range(rows)]
    codes = list(inp.regions.image_tokens)
    assert [(c.row, c.col) for c in codes] == [(r, c) for r in range(rows) for c in range(cols)]
    assert codes[-1].box == ((cols - 1) * CELL, (rows - 1) * CELL, cols * CELL, rows * CELL)


def test_related_patches_by_painting(tiny_mistral3, make_image):
    check_related_by_painting(tiny_mistral3, make_image(40, 24), [(4, 4, 10, 8), (20, 2, 18, 20), (0, 0, 40, 6)])
    check_related_by_painting(tiny_mistral3, make_image(24, 56), [(2, 30, 6, 20), (0, 0, 24, 10), (10, 10, 4, 4)])
    check_related_by_painting(tiny_mistral3, make_image(100, 60), [(10, 5, 30, 12), (60, 30, 38, 28)])


def test_flow_cli(tiny_mistral3_path, tmp_path, make_image):
    table = check_flow_cli(tiny_mistral3_path, tmp_path, make_image, [(40, 24), (24, 56), (64, 64)])
    assert set(table["question_id"]) == {"q0", "q1", "q2"}


def test_knockout_is_proved_live_at_load(tiny_mistral3):
    assert tiny_mistral3.self_checks["knockout_live"] > 0
    assert tiny_mistral3.family.name == "mistral3"
