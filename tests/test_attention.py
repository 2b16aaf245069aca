"""Attention mass between regions, cross-checked against the patterns cached by run_with_cache."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mm_lens.attention import (
    ATTENTION_COLUMNS,
    REST,
    attention_mass,
    attention_samples,
    image_attention,
    pattern_hook_name,
)
from mm_lens.data.gqa import Sample, SampleSkip
from mm_lens.errors import MMLensError
from mm_lens.inputs import prepare

QUESTION = "What color is the ball?"


def cached_patterns(model, inp):
    names = [pattern_hook_name(layer) for layer in range(model.n_layers)]
    input_ids, kwargs = inp.forward_args()
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(input_ids, names_filter=lambda n: n in names, **kwargs)
    return [cache[n][0].float().mean(0) for n in names]  # [q_pos, k_pos], head-averaged


@pytest.mark.parametrize("which", ["tiny_llava", "tiny_llava_next"])
def test_attention_mass_matches_the_cached_patterns(which, request, make_image):
    model = request.getfixturevalue(which)
    inp = prepare(model, make_image(48, 32, seed=5), QUESTION)
    df = attention_mass(model, inp)
    assert list(df.columns) == ["layer", "target", "source", "mass"]
    assert len(df) == model.n_layers * 2 * 3
    r = inp.regions
    rest = [p for p in range(r.seq_len) if p not in set(r.image_positions) | set(r.question)]
    for layer, pattern in enumerate(cached_patterns(model, inp)):
        for target, rows in (("Question", r.question), ("Last", [r.last])):
            got = df[(df.layer == layer) & (df.target == target)].set_index("source")["mass"]
            for source, cols in (("Image", r.image_positions), ("Question", r.question), (REST, rest)):
                expected = float(pattern[rows][:, cols].sum(-1).mean())
                assert got[source] == pytest.approx(expected, abs=1e-5), (layer, target, source)
            assert got.sum() == pytest.approx(1.0, abs=1e-5)  # the sources partition the row


def test_attention_mass_layers_and_errors(tiny_llava, make_image):
    inp = prepare(tiny_llava, make_image(seed=6), QUESTION)
    df = attention_mass(tiny_llava, inp, targets=["Last"], sources=["Image"], layers=[1, 3])
    assert sorted(df.layer.unique()) == [1, 3] and set(df.source) == {"Image", REST}
    with pytest.raises(MMLensError, match="outside the model's layers"):
        attention_mass(tiny_llava, inp, layers=[tiny_llava.n_layers])
    with pytest.raises(MMLensError, match="unknown region"):
        attention_mass(tiny_llava, inp, sources=["Picture"])
    with pytest.raises(MMLensError, match="added automatically"):
        attention_mass(tiny_llava, inp, sources=["Image", "Rest"])


def test_image_attention_per_patch(tiny_llava, make_image):
    inp = prepare(tiny_llava, make_image(seed=7), QUESTION)
    df = image_attention(tiny_llava, inp, target="Last", layers=[2])
    r = inp.regions
    assert list(df.position) == r.image_positions and list(df.row) == r.patch_row and list(df.col) == r.patch_col
    pattern = cached_patterns(tiny_llava, inp)[2]
    torch.testing.assert_close(torch.tensor(df.attention.to_numpy(), dtype=torch.float32),
                               pattern[r.last, r.image_positions], atol=1e-6, rtol=1e-5)
    mass = attention_mass(tiny_llava, inp, targets=["Last"], sources=["Image"], layers=[2])
    assert df.attention.sum() == pytest.approx(mass[mass.source == "Image"].mass.item(), abs=1e-5)


def test_attention_samples_table_and_skips(tiny_llava, make_image):
    samples = [
        Sample(question_id=f"q{i}", img_id=f"i{i}", question=QUESTION, answer="red", true_option=None,
               false_option=None, image_w=32, image_h=32, boxes=(), task="QueryAttr")
        for i in range(3)
    ]

    def load(sample):
        if sample.question_id == "q1":
            raise SampleSkip("image i1 is missing", "missing image")
        return make_image(seed=int(sample.question_id[1:]))

    result = attention_samples(tiny_llava, samples, load, progress=False)
    assert list(result.table.columns) == ATTENTION_COLUMNS
    assert sorted(result.table.question_id.unique()) == ["q0", "q2"]
    assert result.n_samples == 3 and [s.question_id for s in result.skips] == ["q1"]
    assert isinstance(result.table, pd.DataFrame)
