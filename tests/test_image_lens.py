"""Logit lens on the image tokens, on the tiny random LLaVA models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mm_lens.errors import MMLensError
from mm_lens.image_lens import TOP_COLUMNS, WORD_COLUMNS, image_lens_figure, image_token_lens
from mm_lens.inputs import prepare
from mm_lens.protocol import LensReadout

QUESTION = "Is the ball red or blue ?"
WORDS = ["ball", "red", "Blue"]


def _model_probs(model, inp):
    with torch.inference_mode():
        return model.bridge(inp.input_ids, **inp.model_kwargs())[0].float().softmax(-1)  # [pos, vocab]


@pytest.mark.parametrize("which", ["tiny_llava", "tiny_llava_next"])
def test_top_point_is_the_models_own_output(which, request, make_image):
    model = request.getfixturevalue(which)
    inp = prepare(model, make_image(48, 32, seed=11), QUESTION)
    n_img, k = len(inp.regions.image_positions), 4
    result = image_token_lens(model, inp, k=k, words=WORDS, chunk_size=5)
    top, words = result.top, result.words
    assert list(top.columns) == TOP_COLUMNS and list(words.columns) == WORD_COLUMNS
    assert result.readout == "norm" and result.k == k
    assert len(top) == model.n_layers * n_img * k
    assert len(words) == model.n_layers * n_img * len(WORDS)

    probs = _model_probs(model, inp)
    last = top[top.layer == model.n_layers - 1]
    worst = 0.0
    for pos in inp.regions.image_positions:
        want_p, want_i = probs[pos].topk(k)
        got = last[last.position == pos].sort_values("rank")
        assert got.token_id.tolist() == want_i.tolist()
        worst = max(worst, float(np.max(np.abs(got.prob.to_numpy() - want_p.numpy()) / want_p.numpy())))
        for word in WORDS:
            row = words[(words.layer == model.n_layers - 1) & (words.position == pos) & (words.word == word)].iloc[0]
            tok = model.tokenizer.convert_tokens_to_ids(word)
            assert row.token_id == tok
            assert row.prob == pytest.approx(float(probs[pos, tok]), rel=1e-5)
    assert worst < 1e-5


def test_top_k_sorted_and_coordinates(tiny_llava_next, make_image):
    inp = prepare(tiny_llava_next, make_image(48, 32, seed=12), QUESTION)
    regions = inp.regions
    top = image_token_lens(tiny_llava_next, inp, layers=[0, 2], k=3).top
    assert sorted(top.layer.unique()) == [0, 2]
    assert len(top) == 2 * len(regions.image_positions) * 3
    for _, group in top.groupby(["layer", "position"]):
        assert group["rank"].tolist() == [1, 2, 3]
        assert group.prob.is_monotonic_decreasing
    one = top[(top.layer == 0) & (top["rank"] == 1)].set_index("position")
    for i, pos in enumerate(regions.image_positions):
        assert one.loc[pos, ["tile", "row", "col", "grid_row", "grid_col"]].tolist() == [
            regions.patch_tile[i],
            regions.patch_row[i],
            regions.patch_col[i],
            regions.grid_row[i],
            regions.grid_col[i],
        ]
    assert (top.tile > 0).any() and (top.col == -1).any()  # any-res crops and row separators are there


def test_raw_readout_from_the_embeddings(tiny_llava, make_image):
    """Point l = the stream entering block l, unembedded without the final norm; the top point is the output."""
    model = tiny_llava
    inp = prepare(model, make_image(seed=13), QUESTION)
    readout = LensReadout(from_embeddings=True, final_norm=False)
    result = image_token_lens(model, inp, k=2, readout=readout)
    assert result.readout == "raw"
    assert sorted(result.top.layer.unique()) == list(range(model.n_layers + 1))
    pos = inp.regions.image_positions[5]
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(inp.input_ids, **inp.model_kwargs())
        raw = model.bridge.unembed(cache["blocks.2.hook_resid_pre"][:, pos : pos + 1])[0, 0].float().softmax(-1)
    got = result.top[(result.top.layer == 2) & (result.top.position == pos)].sort_values("rank")
    want_p, want_i = raw.topk(2)
    assert got.token_id.tolist() == want_i.tolist()
    assert got.prob.tolist() == pytest.approx(want_p.tolist(), rel=1e-5)
    top = result.top[(result.top.layer == model.n_layers) & (result.top.position == pos)].sort_values("rank")
    assert top.prob.tolist() == pytest.approx(_model_probs(model, inp)[pos].topk(2).values.tolist(), rel=1e-5)
    with pytest.raises(MMLensError, match="outside"):
        image_token_lens(model, inp, layers=[model.n_layers + 1], readout=readout)


def test_figure_one_frame_per_layer(tiny_llava, tiny_llava_next, make_image):
    inp = prepare(tiny_llava, make_image(seed=14), QUESTION)
    result = image_token_lens(tiny_llava, inp, k=3, words={"object": "ball"})
    fig = image_lens_figure(result)
    assert len(fig.frames) == tiny_llava.n_layers
    assert len(fig.layout.sliders[0].steps) == tiny_llava.n_layers
    heat = fig.frames[1].data[0]
    assert np.asarray(heat.z).shape == (4, 4)  # the 4 x 4 patch grid
    first = result.top[(result.top.layer == 1) & (result.top["rank"] == 1)]
    assert np.nanmax(np.asarray(heat.z, float)) == pytest.approx(first.prob.max())
    assert "1. " in heat.text[0][0]

    with_image = image_lens_figure(result, word="object", image=make_image(seed=14))
    assert with_image.data[0].type == "image" and with_image.frames[0].traces == (1,)
    with pytest.raises(MMLensError, match="not in the lens result"):
        image_lens_figure(result, word="red")

    next_inp = prepare(tiny_llava_next, make_image(64, 32, seed=15), QUESTION)
    next_result = image_token_lens(tiny_llava_next, next_inp, layers=[1, 3], k=2)
    next_fig = image_lens_figure(next_result.top, image=make_image(64, 32, seed=15))
    assert [f.name for f in next_fig.frames] == ["1", "3"]
    z = np.asarray(next_fig.frames[0].data[0].z, float)
    n_patches = sum(1 for c in next_inp.regions.patch_col if c >= 0)
    assert int(np.isfinite(z).sum()) == n_patches  # every patch of every tile drawn once, no separators
    assert sum(d.type == "image" for d in next_fig.data) == 2  # under the base tile and the any-res grid
