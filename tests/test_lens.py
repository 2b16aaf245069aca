"""Answer logit lens on the tiny random LLaVA models."""

from __future__ import annotations

import pytest
import torch

from mm_lens.errors import MMLensError
from mm_lens.inputs import prepare
from mm_lens.lens import answer_forms, answer_lens, first_token_id, layer_probs

QUESTION = "Is the ball red or blue ?"


def test_answer_forms():
    assert answer_forms("red") == {"answer_lower": "red", "answer_capitalized": "Red"}
    assert answer_forms("Red", "blue") == {
        "answer_lower": "red",
        "answer_capitalized": "Red",
        "false_option_lower": "blue",
        "false_option_capitalized": "Blue",
    }
    assert "false_option_lower" not in answer_forms("yes", "")


@pytest.mark.parametrize("which", ["tiny_llava", "tiny_llava_next"])
def test_last_layer_equals_final_softmax(which, request, make_image):
    model = request.getfixturevalue(which)
    inp = prepare(model, make_image(48, 32, seed=7), QUESTION)
    probs = layer_probs(model, inp)
    with torch.inference_mode():
        final = model.bridge(inp.input_ids, **inp.model_kwargs())[0, -1].float().softmax(-1)
    assert probs.shape == (model.n_layers, final.shape[-1])
    torch.testing.assert_close(probs[-1], final, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(probs[0], final, atol=1e-3)  # earlier layers read something else


def test_answer_lens_table(tiny_llava, make_image):
    inp = prepare(tiny_llava, make_image(seed=8), QUESTION)
    forms = answer_forms("red", "blue")
    table = answer_lens(tiny_llava, inp, forms)
    assert list(table.columns) == ["layer", "form", "prob"]
    assert len(table) == tiny_llava.n_layers * len(forms)
    probs = layer_probs(tiny_llava, inp)
    red = tiny_llava.tokenizer.convert_tokens_to_ids("Red")
    row = table[(table.layer == 2) & (table.form == "answer_capitalized")].iloc[0]
    assert row.prob == pytest.approx(float(probs[2, red]))
    lower = table[table.form == "answer_lower"].prob.to_numpy()
    upper = table[table.form == "answer_capitalized"].prob.to_numpy()
    assert not (lower == upper).all()  # the two spellings are different tokens
    with pytest.raises(MMLensError):
        answer_lens(tiny_llava, inp, {})


def test_first_token_id(tiny_llava):
    tok = tiny_llava.tokenizer
    assert first_token_id(tok, "red ball") == tok.convert_tokens_to_ids("red")
    with pytest.raises(MMLensError, match="tokenises to nothing"):
        first_token_id(tok, "   ")
