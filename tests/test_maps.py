"""mm_lens.maps: the knockout map is the reference engine's, the box map is the sweep's related-patches row, the
gradient map is its own definition's derivative, the attention map is the pattern's mass."""

from __future__ import annotations

import pytest
import torch

from mm_lens import hook_points
from mm_lens.engines import fast_engine, reference_engine
from mm_lens.errors import MMLensError
from mm_lens.inputs import prepare
from mm_lens.knockout import Edge
from mm_lens.maps import MAP_COLUMNS, map_agreement, patch_groups, patch_map
from mm_lens.protocol import vocab_softmax
from mm_lens.sweep import greedy_answer, layer_sweep, layer_window
from mm_lens.types import Box


@pytest.fixture(params=["tiny_llava", "tiny_llava_next"])
def model(request):
    return request.getfixturevalue(request.param)


def _inputs(model, make_image, boxes=None):
    image = make_image(56, 40, seed=5)
    return prepare(model, image, "Is the square red or blue?", boxes=boxes), image


def test_groups_cover_every_patch_once_and_know_their_pixels(model, make_image):
    inp, _ = _inputs(model, make_image)
    patches = [t.position for t in inp.regions.image_tokens if t.box is not None]
    for k in (1, 2):
        groups = patch_groups(model, inp, k)
        flat = [p for g in groups for p in g.positions]
        assert sorted(flat) == sorted(patches)  # newline features and CLS are not patches
        assert all(g.rows <= k and g.cols <= k for g in groups)
    singles = patch_groups(model, inp, 1)
    with_pixels = [g for g in singles if g.box is not None]
    assert with_pixels and all(0 <= g.box[0] < g.box[2] <= 56 and 0 <= g.box[1] < g.box[3] <= 40 for g in with_pixels)
    if model.model_type == "llava_next":
        assert len({g.tile for g in singles}) > 1  # the base image and the any-res tiles


def test_knockout_map_equals_the_reference_engine(model, make_image):
    inp, _ = _inputs(model, make_image)
    groups = patch_groups(model, inp, 1)
    groups = groups[:: max(1, len(groups) // 12)]  # a sample of groups, across tiles
    token = greedy_answer(model, inp).first_token
    window = range(1, 3)
    edges = [Edge(g.name, "Question", source_positions=g.positions) for g in groups]
    fast = fast_engine(model, inp, edges, [window], token)[:, 0]
    ref = reference_engine(model, inp, edges, [window], token)[:, 0]
    assert torch.allclose(fast, ref, rtol=1e-5, atol=0), ((fast - ref).abs() / ref).max()
    ids, kwargs = inp.forward_args()
    with torch.inference_mode():
        clean = vocab_softmax(model.bridge(ids, **kwargs)[0, -1], inp.vocab_size(model))[token]
    assert (ref - clean).abs().max() > 1e-7  # some patch moves the answer: the equality is not vacuous
    table = patch_map(model, inp, "Question", layers=window, group=1)
    assert list(table.columns) == list(MAP_COLUMNS) and len(table) == len(patch_groups(model, inp, 1))


def test_box_map_equals_the_sweeps_related_patches_row(model, make_image):
    box = Box(8, 4, 24, 20, "square")
    inp, image = _inputs(model, make_image, boxes=[box])
    k, layer = 2, 2
    sweep = layer_sweep(model, inp, ["Related Image Patches->Question"], window=k)
    row = sweep.loc[sweep.layer == layer].iloc[0]
    table = patch_map(model, inp, "Question", layers=layer_window(layer, k, model.n_layers), group="box",
                      boxes=[box], image=image)
    assert len(table) == 1 and table.group.iloc[0] == "square"
    # the same knockout probability within float32 batching noise (the sweep runs its windows as one batch)
    knockout_prob = row.base_prob * (1 + table.value.iloc[0] / 100)
    assert knockout_prob == pytest.approx(row.knockout_prob, rel=1e-5)
    assert abs(row.relative_change_pct) > 1e-3  # the box's patches matter: not a vacuous equality


def _logp_with_pattern_shift(model, inp, groups, index, target_rows, window, token, eps):
    """The answer's log-probability when the target rows' patterns move by eps * (knockout pattern - pattern)."""
    group = list(groups[index].positions)

    def shift(pattern, hook):
        p = pattern.clone()
        rows = p[:, :, target_rows]
        mass = rows[..., group].sum(-1, keepdim=True)
        knocked = rows / (1 - mass)
        knocked[..., group] = 0
        p[:, :, target_rows] = rows + eps * (knocked - rows)
        return p

    ids, kwargs = inp.forward_args()
    hooks = [(hook_points.attn_pattern(layer), shift) for layer in window]
    with torch.inference_mode():
        logits = model.bridge.run_with_hooks(ids, fwd_hooks=hooks, **kwargs)
    return float(logits[0, -1, :inp.vocab_size(model)].double().log_softmax(-1)[token])


def test_gradient_map_is_the_derivative_of_its_definition(tiny_llava, make_image):
    """The estimate is d logp / d eps of logp(pattern + eps * (knockout pattern - pattern)) at eps = 0, x100.

    Checked by central differences with Richardson extrapolation (steps 0.2 and 0.1: the h^2 term cancels). The
    forward pass rounds the log-probability to about 1e-7 (float32 softmax inside the bridge, even for a float64
    model), which a step of 0.1 turns into about 1e-4 on these values: hence rel=3e-3; a wrong formula (say,
    without the renormalisation of the row) is off by tens of percent.
    """
    inp, _ = _inputs(tiny_llava, make_image)
    window = range(1, 3)
    table = patch_map(tiny_llava, inp, "Question", layers=window, method="gradient")
    groups = patch_groups(tiny_llava, inp, 1)
    token = int(table.token_id.iloc[0])
    targets = inp.regions.positions("Question")
    for index in (0, 5, 10):
        central = {}
        for eps in (0.2, 0.1):
            up = _logp_with_pattern_shift(tiny_llava, inp, groups, index, targets, window, token, eps)
            down = _logp_with_pattern_shift(tiny_llava, inp, groups, index, targets, window, token, -eps)
            central[eps] = 100 * (up - down) / (2 * eps)
        derivative = (4 * central[0.1] - central[0.2]) / 3
        assert table.value.iloc[index] == pytest.approx(derivative, rel=3e-3, abs=1e-6)


def test_attention_map_is_the_patterns_mass(tiny_llava, make_image):
    inp, _ = _inputs(tiny_llava, make_image)
    window = range(0, 2)
    table = patch_map(tiny_llava, inp, "Last", layers=window, method="attention")
    groups = patch_groups(tiny_llava, inp, 1)
    ids, kwargs = inp.forward_args()
    with torch.inference_mode():
        _, cache = tiny_llava.bridge.run_with_cache(ids, **kwargs)
    last = inp.regions.last
    expected = torch.stack([cache[hook_points.attn_pattern(layer)][0, :, last] for layer in window]).mean((0, 1))
    got = [float(expected[list(g.positions)].sum()) for g in groups]
    assert table.value.tolist() == pytest.approx(got, rel=1e-5, abs=1e-8)
    assert 0 < table.value.sum() <= 1 + 1e-6


def test_a_map_per_answer_token(tiny_llava, make_image):
    inp, _ = _inputs(tiny_llava, make_image)
    greedy = greedy_answer(tiny_llava, inp)
    table = patch_map(tiny_llava, inp, "Last", layers=range(0, 2), method="attention", steps="all")
    steps = table.groupby("step").token_id.first()
    assert steps.tolist() == (greedy.token_ids or [greedy.first_token])


def test_agreement_table_and_bad_options(tiny_llava, make_image):
    inp, _ = _inputs(tiny_llava, make_image)
    table = patch_map(tiny_llava, inp, "Question", layers=range(1, 3), method=["knockout", "attention", "gradient"])
    agree = map_agreement(table, k=5)
    assert set(agree.method) == {"attention", "gradient"}
    assert agree.spearman.between(-1, 1).all() and agree.top_k_overlap.between(0, 1).all()
    with pytest.raises(MMLensError, match="unknown map method"):
        patch_map(tiny_llava, inp, method="saliency")
    with pytest.raises(MMLensError, match="group="):
        patch_map(tiny_llava, inp, group=0)
    with pytest.raises(MMLensError, match="unknown region"):
        patch_map(tiny_llava, inp, target="Nowhere")
