"""Idefics3 and SmolVLM on tiny random checkpoints: knockout vs the oracle, image positions / markers, painted
boxes across tiles, the flow CLI, and the knockout-is-live proof at load."""

from __future__ import annotations

import json

import pytest

from family_checks import check_flow_cli, check_image_positions, check_knockout_oracle, check_related_by_painting
from family_tokenizers import saved_tokenizer
from oracle import plain_model

TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
SPECIAL = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
KINDS = ["idefics3", "smolvlm"]


def build(out, kind):
    import torch

    tok = saved_tokenizer("llama3_1", out / "tok", add=SPECIAL)
    tok.chat_template = TEMPLATE
    if kind == "idefics3":
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Img
    else:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as Img
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                pad_token_id=0, rms_norm_eps=1e-5)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    config = Config(text_config=text, vision_config=vision, scale_factor=2,
                    image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=0)
    torch.manual_seed(0)
    model = Model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    image_processor = Img(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    path = out / "ckpt"
    model.save_pretrained(path)
    image_processor.save_pretrained(path)
    tok.save_pretrained(path)
    # what the family's processor_without_video reads (no processor saved: SmolVLM's would need its video part)
    (path / "processor_config.json").write_text(json.dumps({"image_seq_len": 4}))
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    from mm_lens.model import load

    path = build(tmp_path_factory.mktemp(request.param), request.param)
    return path, load(str(path))


def test_knockout_equals_the_oracle_for_both_engines(tiny, make_image):
    from mm_lens.inputs import prepare

    path, model = tiny
    inp = prepare(model, make_image(48, 32), "Is the cube red or blue ?", protocol="checkpoint",
                  spans={"True Option": "red"})
    plain = plain_model(str(path))
    # tests/oracle.py looks for the decoder at model.model.language_model; Idefics3 names it text_model
    object.__setattr__(plain.model, "language_model", plain.model.text_model)
    worst = check_knockout_oracle(model, plain, inp, [
        "Image->Question", "Question->Last", "Image->Last", "Image Markers->Last"], [range(0, 2), range(1, 3)])
    print(f"{model.model_type}: {worst}")
    assert worst["moved"] > 1e-3


def test_image_positions_and_markers(tiny, make_image):
    from mm_lens.inputs import prepare

    _, model = tiny
    inp = prepare(model, make_image(48, 32), "What is this ?", protocol="checkpoint")
    check_image_positions(model, inp)
    ids = inp.input_ids[0].tolist()
    tokens = model.tokenizer.convert_ids_to_tokens(ids)
    image = inp.regions.positions("Image")
    markers = inp.regions.positions("Image Markers")
    n_tiles = len(image) // 4
    assert n_tiles > 2 and len(image) == 4 * n_tiles  # split tiles + the global tile, 4 features each
    assert [tokens[p] for p in markers].count("<fake_token_around_image>") == n_tiles + 1
    assert "<global-img>" in [tokens[p] for p in markers]
    assert set(markers) == {p for p in range(markers[0], markers[-1] + 1) if p not in set(image)}
    assert tokens[markers[-1]] == "<fake_token_around_image>" and markers[-1] == image[-1] + 1
    # the global tile is last, and is the base tile
    tiles = [t.tile for t in inp.regions.image_tokens]
    assert tiles == sorted(tiles) and model.family.base_tile(inp.regions.image_tokens) == n_tiles - 1


def test_pixel_shuffle_codes(tiny):
    from mm_lens.families.idefics3 import tile_codes

    _, model = tiny
    codes = tile_codes(model)
    assert [b for _, _, b in codes] == [(0, 0, 16, 16), (16, 0, 32, 16), (0, 16, 16, 32), (16, 16, 32, 32)]


def test_related_by_painting_across_tiles(tiny, make_image):
    _, model = tiny
    image = make_image(48, 32)
    check_related_by_painting(model, image, [(4, 4, 6, 4), (20, 2, 6, 26), (0, 0, 48, 6), (10, 10, 30, 14)])


def test_flow_cli(tiny, tmp_path, make_image):
    path, _ = tiny
    check_flow_cli(path, tmp_path, make_image, [(48, 32), (32, 48)])


def test_knockout_is_proved_live_at_load(tiny):
    assert tiny[1].self_checks["knockout_live"] > 0
