"""mm_lens.regions: prompts, image-token layout (checked against the model's own data flow), named regions."""

from __future__ import annotations

import pytest
import torch

from mm_lens.encoders import DEFAULT_INSTRUCTION
from mm_lens.errors import MMLensError
from mm_lens.inputs import MultimodalInput, prepare
from mm_lens.regions import ImageToken, RegionMap

QUESTION = "Is the ball red or blue?"
SIZES = [(32, 32), (48, 32), (32, 48), (64, 20), (20, 64), (64, 64)]  # (width, height)


@pytest.fixture(params=["llava", "llava_next"])
def model(request):
    return request.getfixturevalue("tiny_llava" if request.param == "llava" else "tiny_llava_next")


def _image_features(model, inp: MultimodalInput) -> torch.Tensor:
    """The image features HF scatters into the image-token slots, in order."""
    kwargs = {"pixel_values": inp.pixel_values}
    if inp.image_sizes is not None:
        kwargs["image_sizes"] = inp.image_sizes
    with torch.inference_mode():
        out = model.hf_model.model.get_image_features(**kwargs).pooler_output
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in out])


def _tile_features(model, inp: MultimodalInput) -> torch.Tensor:
    """Projected vision features per processed tile: (tiles, patches, d), CLS dropped."""
    tiles = inp.pixel_values.reshape(-1, *inp.pixel_values.shape[-3:])
    hf = model.hf_model.model
    with torch.inference_mode():
        hidden = hf.vision_tower(tiles, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        return hf.multi_modal_projector(hidden[:, 1:])


def test_prompt_follows_chat_template(model, make_image):
    inp = prepare(model, make_image(), QUESTION)
    assert inp.prompt == f"USER: <image>\n{QUESTION} \n{DEFAULT_INSTRUCTION} ASSISTANT:"
    assert inp.question == QUESTION


def test_prompt_without_template_uses_llava15_format(model, make_image, monkeypatch):
    monkeypatch.setattr(model.processor, "chat_template", None)
    monkeypatch.setattr(model.tokenizer, "chat_template", None)
    inp = prepare(model, make_image(), QUESTION, instruction="Say it.")
    assert inp.prompt == f"USER: <image>\n{QUESTION} \nSay it. ASSISTANT:"
    assert model.tokenizer.decode(inp.input_ids[0, inp.regions.question]).replace(" ", "") == QUESTION.replace(" ", "")


@pytest.mark.parametrize("size", SIZES)
def test_image_positions_match_model_features(model, make_image, size):
    inp = prepare(model, make_image(*size), QUESTION)
    r = inp.regions
    ids = inp.input_ids[0]
    expected = (ids == model.config.image_token_id).nonzero().flatten().tolist()
    assert r.image_positions == expected
    assert len(r.image_positions) == _image_features(model, inp).shape[0]
    n = len(r.image_positions)
    for per_token in (r.patch_tile, r.patch_row, r.patch_col, r.is_newline, r.patch_box, r.grid_row, r.grid_col):
        assert len(per_token) == n
    assert r.image_positions == list(range(r.image_positions[0], r.image_positions[0] + n))  # one block


@pytest.mark.parametrize("size", SIZES[:3])
def test_question_span_decodes_to_question_and_last_is_final(model, make_image, size):
    inp = prepare(model, make_image(*size), QUESTION)
    r = inp.regions
    decoded = model.tokenizer.decode(inp.input_ids[0, r.question])
    assert decoded.replace(" ", "") == QUESTION.replace(" ", "")
    assert r.question == list(range(r.question[0], r.question[-1] + 1))
    assert r.question[0] > r.image_positions[-1]
    assert r.seq_len == inp.input_ids.shape[1]
    assert r.last == r.seq_len - 1
    assert r.positions("Last") == [r.seq_len - 1]
    # The instruction is not part of the question.
    answer_pos = r.question[-1] + 2  # "?", "\n", "Answer"
    assert model.tokenizer.decode(inp.input_ids[0, answer_pos : answer_pos + 1]) == "Answer"


def test_llava_grid_is_row_major(tiny_llava, make_image):
    r = prepare(tiny_llava, make_image(48, 32), QUESTION).regions
    side = 4
    assert len(r.image_positions) == side * side
    assert r.patch_tile == [0] * 16
    assert r.patch_row == [i // side for i in range(16)]
    assert r.patch_col == [i % side for i in range(16)]
    assert not any(r.is_newline)
    assert r.patch_box[5] == (8, 8, 16, 16) and r.patch_box[15] == (24, 24, 32, 32)
    assert r.tile_size == 32


def test_llava_next_layout_matches_vision_tower_per_tile(tiny_llava_next, make_image):
    """Each image-token feature equals the projected vision feature of its (tile, row, col)."""
    model = tiny_llava_next
    for size in SIZES:
        inp = prepare(model, make_image(*size, seed=7), QUESTION)
        r = inp.regions
        packed = _image_features(model, inp)
        per_tile = _tile_features(model, inp)
        newline = model.hf_model.model.image_newline
        assert set(r.patch_tile) == set(range(per_tile.shape[0])), size
        assert r.patch_tile[:16] == [0] * 16 and r.patch_row[:16] == [i // 4 for i in range(16)]
        for i in range(len(r.image_positions)):
            if r.is_newline[i]:
                assert r.patch_col[i] == -1 and r.patch_box[i] is None
                torch.testing.assert_close(packed[i], newline.detach())
                assert i + 1 == len(r.image_positions) or not r.is_newline[i + 1]
            else:
                feature = per_tile[r.patch_tile[i], r.patch_row[i] * 4 + r.patch_col[i]]
                torch.testing.assert_close(packed[i], feature)
        # One separator closes each row of the unpadded any-res grid.
        anyres = [i for i in range(16, len(r.image_positions)) if not r.is_newline[i]]
        n_rows = len({r.grid_row[i] for i in anyres})
        assert sum(r.is_newline) == n_rows
        assert r.is_newline[-1]


def test_llava_next_wide_image_is_unpadded_to_its_rows(tiny_llava_next, make_image):
    # 64x20 (w x h) -> best fit 32x64 (h x w) canvas, 2 tiles side by side; the image fills 20/64 of the
    # height, i.e. the middle 2-3 of 4 patch rows survive unpadding.
    r = prepare(tiny_llava_next, make_image(64, 20), QUESTION).regions
    anyres = [i for i in range(16, len(r.image_positions)) if not r.is_newline[i]]
    rows = sorted({r.patch_row[i] for i in anyres})
    assert rows and rows[0] > 0 and rows[-1] < 3
    assert {r.patch_tile[i] for i in anyres} == {1, 2}
    assert max(r.grid_col[i] for i in anyres) == 7  # two 4-patch-wide tiles side by side
    assert sum(r.is_newline) == len(rows)


def test_patch_boxes_select_exactly_their_patch_embedding(model, make_image):
    """Perturbing the pixels of a token's patch box changes only that token's patch embedding."""
    inp = prepare(model, make_image(48, 32, seed=1), QUESTION)
    r = inp.regions
    tiles = inp.pixel_values.reshape(-1, *inp.pixel_values.shape[-3:])
    embeddings = model.hf_model.model.vision_tower.vision_model.embeddings
    with torch.inference_mode():
        base = embeddings(tiles)
        for i, box in enumerate(r.patch_box):
            if box is None:
                continue
            x0, y0, x1, y1 = box
            poked = tiles.clone()
            poked[r.patch_tile[i], :, y0:y1, x0:x1] += 1.0
            changed = (embeddings(poked) - base).abs().amax(-1).nonzero().tolist()
            assert changed == [[r.patch_tile[i], 1 + r.patch_row[i] * 4 + r.patch_col[i]]]


def test_spans_and_named_positions(model, make_image):
    inp = prepare(model, make_image(), QUESTION, spans={"True Option": "red", "False Option": "blue"})
    r = inp.regions
    tok = model.tokenizer
    assert tok.decode(inp.input_ids[0, r.positions("True Option")]) == "red"
    assert tok.decode(inp.input_ids[0, r.positions("false option")]) == "blue"
    assert set(r.positions("True Option")) <= set(r.question)
    assert r.positions("Image") == r.image_positions
    assert r.positions("question") == r.question
    # Instruction words are findable too; case-insensitive fallback when the exact case is absent.
    inp2 = prepare(model, make_image(), QUESTION, spans={"phrase": "phrase", "ball": "Ball"})
    assert tok.decode(inp2.input_ids[0, inp2.regions.spans["phrase"]]) == "phrase"
    assert tok.decode(inp2.input_ids[0, inp2.regions.spans["ball"]]) == "ball"


def test_span_not_found_names_it(tiny_llava, make_image):
    with pytest.raises(MMLensError, match="'True Option' = 'green'"):
        prepare(tiny_llava, make_image(), QUESTION, spans={"True Option": "green"})


def test_related_other_need_boxes_and_unknown_names_list_valid_ones(tiny_llava, make_image):
    r = prepare(tiny_llava, make_image(), QUESTION).regions
    for name in (
        "Related Image Patches", "Other Image Patches", "Image Central Object", "Image Without Central Object"
    ):
        with pytest.raises(MMLensError, match="boxes"):
            r.positions(name)
    r.related, r.other = r.image_positions[:3], r.image_positions[3:]
    assert r.positions("Image Central Object") == r.image_positions[:3]
    assert r.positions("Other Image Patches") == r.image_positions[3:]
    with pytest.raises(MMLensError, match="unknown region 'Text'") as err:
        r.positions("Text")
    assert "Image, Question, Last, Related Image Patches" in str(err.value)


def test_model_kwargs_run_the_bridge(model, make_image):
    inp = prepare(model, make_image(40, 24), QUESTION)
    kwargs = inp.model_kwargs()
    assert "input_ids" not in kwargs
    assert ("image_sizes" in kwargs) == (model.model_type == "llava_next")
    with torch.inference_mode():
        logits = model.bridge(inp.input_ids, **kwargs)
    assert logits.shape[:2] == (1, inp.regions.seq_len)


def test_empty_question_is_an_error(tiny_llava, make_image):
    with pytest.raises(MMLensError, match="question is empty"):
        prepare(tiny_llava, make_image(), "   ")


def test_region_map_lookup_helpers():
    tokens = (ImageToken(1, tile=0, row=0, col=0, grid_row=0, grid_col=0),
              ImageToken(2, tile=0, row=0, col=1, grid_row=0, grid_col=1))
    r = RegionMap(seq_len=5, image_tokens=tokens, question=[3], last=4, spans={"Obj": [3]})
    assert r.positions(" obj ") == [3]
    assert r.image_token_index(2) == 1
    with pytest.raises(MMLensError, match="not an image token"):
        r.image_token_index(3)
    assert "Obj" in r.names() and "Image Central Object" in r.names()
