"""Gemma 3 (`mm_lens.families.gemma3`) on a tiny random checkpoint: the family checks (`family_checks`).

The checkpoint: a 64 px SigLIP tower with 8 px patches (8 x 8 patches, pooled 2 x 2 to 16 features), a 4-layer
Gemma 3 text model (hidden 64, a sliding window longer than any prompt), the real Gemma 3 tokenizer and chat
template (`family_tokenizers`).
"""

from __future__ import annotations

import json

import pytest
import torch

from family_checks import check_flow_cli, check_image_positions, check_knockout_oracle, check_related_by_painting
from family_tokenizers import saved_tokenizer, tokenizer_files
from oracle import knockout_probability, plain_model

IMAGE, PATCH, FEATURES = 64, 8, 16
TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def build(path, **text_config):
    """The tiny checkpoint at `path`; `text_config` overrides the text model's settings (e.g. a short window)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    template = json.loads((tokenizer_files("gemma3") / "tokenizer_config.json").read_text())["chat_template"]
    tokenizer = saved_tokenizer("gemma3", path / "tok", add=list(TOKENS.values()), bos_token="<bos>",
                                eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", extra_special_tokens=TOKENS)
    text = Gemma3TextConfig(vocab_size=262145, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                            **{"sliding_window": 1024, "max_position_embeddings": 2048, **text_config})
    vision = SiglipVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=FEATURES,
                          boi_token_index=tokenizer.convert_tokens_to_ids(TOKENS["boi_token"]),
                          eoi_token_index=tokenizer.convert_tokens_to_ids(TOKENS["eoi_token"]),
                          image_token_index=tokenizer.convert_tokens_to_ids(TOKENS["image_token"]))
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # the projection starts at zero: make the image matter
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    model.save_pretrained(path)
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                    image_seq_length=FEATURES).save_pretrained(path)


@pytest.fixture(scope="module")
def gemma3_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gemma3")
    build(path)
    return path


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    from mm_lens.model import load

    return load(str(gemma3_path))


@pytest.fixture(scope="module")
def plain(gemma3_path):
    return plain_model(str(gemma3_path))


def _inp(model, image, **kw):
    from mm_lens.inputs import prepare

    return prepare(model, image, "Is the cube red or blue ?", protocol="checkpoint", **kw)


def test_knockout_equals_oracle(gemma3, plain, make_image):
    inp = _inp(gemma3, make_image(40, 32), spans={"True Option": "red"})
    assert set(inp.extra) == {"token_type_ids"} and inp.regions.full_forward_spans
    worst = check_knockout_oracle(gemma3, plain, inp, ["Image->Question", "Question->Last", "Image->Last",
                                                       "Image Markers->Last"], [range(0, 2), range(2, 4)])
    print("gemma3 oracle", worst)


def test_knockout_inside_the_bidirectional_image(gemma3, plain, make_image):
    """A target inside the image changes positions before it (they see it both ways): the fast engine must not
    reuse a clean prefix there, nor run a suffix that holds the image (a target before it), and both engines equal
    the oracle."""
    from mm_lens.engines import fast_engine, reference_engine
    from mm_lens.knockout import Edge, edge_positions

    inp = _inp(gemma3, make_image(40, 32))
    image = inp.regions.positions("Image")
    boi = min(inp.regions.markers)  # <start_of_image>, before the image: a suffix from it would hold the image
    edges = [Edge(source="Image", target="Image", source_positions=(image[0],), target_positions=(image[8],)),
             Edge(source="Image", target="Image", source_positions=tuple(image[8:]), target_positions=(image[2],)),
             Edge(source="Text", target="Image Markers", source_positions=tuple(range(boi)), target_positions=(boi,))]
    windows = [range(0, 4), range(1, 3)]
    n_vocab = inp.vocab_size(gemma3)
    input_ids, kwargs = inp.forward_args()
    with torch.inference_mode():
        logits = gemma3.bridge(input_ids, **kwargs)[0, -1, :n_vocab]
    token = int(logits.argmax())
    clean = float(logits.float().softmax(-1)[token])
    moved = 0.0
    fast = fast_engine(gemma3, inp, edges, windows, token)
    ref = reference_engine(gemma3, inp, edges, windows, token)
    for b, edge in enumerate(edges):
        for w, window in enumerate(windows):
            want = knockout_probability(plain, inp, [edge_positions(inp.regions, edge)], window, token,
                                        vocab_size=n_vocab)
            for got in (fast[b, w], ref[b, w]):
                assert abs(float(got) - want) <= 1e-5 * abs(want)
            moved = max(moved, abs(want - clean) / clean)
    print("gemma3 inside-image move", moved, inp.prompt[:80].encode("unicode_escape"))
    assert moved > 1e-4, "no knockout inside the image moved the probability"


def test_sliding_window_layers(tmp_path_factory, make_image):
    """Sliding-window layers shorter than the prompt, alternating with full ones (each with its own rotary
    embedding): the fast engine's layer path masks what the window hides, and equals the oracle."""
    from mm_lens.engines import _Stack
    from mm_lens.model import load

    path = tmp_path_factory.mktemp("tiny_gemma3_sliding")
    build(path, sliding_window=12, layer_types=["sliding_attention", "full_attention"] * 2)
    model, plain = load(str(path)), plain_model(str(path))
    stack = _Stack.of(model)
    assert stack is not None and [lay.window for lay in stack.layers] == [12, None, 12, None]
    assert {lay.rope_type for lay in stack.layers} == {"sliding_attention", "full_attention"}
    inp = _inp(model, make_image(40, 32), spans={"True Option": "red"})
    assert inp.regions.seq_len > 3 * 12
    worst = check_knockout_oracle(model, plain, inp, ["Question->Last", "Image->Last", "Last->Last",
                                                      "True Option->Last"], [range(0, 2), range(2, 4)])
    print("gemma3 sliding", worst)


def test_image_positions_and_markers(gemma3, make_image):
    inp = _inp(gemma3, make_image(48, 32))
    check_image_positions(gemma3, inp)
    image = inp.regions.positions("Image")
    assert len(image) == FEATURES and image == list(range(image[0], image[0] + FEATURES))
    markers = inp.regions.positions("Image Markers")
    ids = inp.input_ids[0].tolist()
    assert [ids[p] for p in markers] == [gemma3.config.boi_token_index, gemma3.config.eoi_token_index]
    assert markers == [image[0] - 1, image[-1] + 1]
    assert inp.extra["token_type_ids"][0].tolist() == [int(i == gemma3.image_token_id) for i in ids]
    boxes = [t.box for t in inp.regions.image_tokens]
    assert boxes[0] == (0, 0, 16, 16) and boxes[5] == (16, 16, 32, 32) and boxes[-1] == (48, 48, 64, 64)


def test_related_by_painting(gemma3, make_image):
    check_related_by_painting(gemma3, make_image(48, 32), [(4, 4, 10, 8), (20, 2, 24, 28), (0, 0, 48, 6),
                                                           (30, 20, 4, 4)])


def test_flow_cli(gemma3_path, gemma3, tmp_path, make_image):
    check_flow_cli(gemma3_path, tmp_path, make_image, [(40, 32), (24, 48)])


def test_knockout_is_proved_live_at_load(gemma3):
    assert gemma3.self_checks["knockout_live"] > 0
