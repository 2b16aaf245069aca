"""Attention knockout semantics on the tiny random LLaVA models."""

from __future__ import annotations

import pytest
import torch

from mm_lens.errors import MMLensError
from mm_lens.knockout import (
    REGION_NAMES,
    block_hooks,
    hook_name,
    knockout_hook,
    knockout_hooks,
)
from mm_lens.knockout import (
    Edge as Block,
)
from mm_lens.knockout import (
    parse_edge as parse_block,
)

TEXT = "USER: <image>\nWhat color is the ball ? ASSISTANT:"


def encode(model, image):
    """Processor inputs for the raw test prompt: (input_ids, kwargs for the bridge), image positions."""
    enc = model.processor(images=image, text=TEXT, return_tensors="pt")
    input_ids = enc.pop("input_ids")
    image_id = model.tokenizer.convert_tokens_to_ids("<image>")
    image_pos = (input_ids[0] == image_id).nonzero()[:, 0].tolist()
    return input_ids, dict(enc), image_pos


def run(model, input_ids, kwargs, hooks=()):
    with torch.inference_mode():
        return model.bridge.run_with_hooks(input_ids, fwd_hooks=list(hooks), **kwargs)


def grab_patterns(model, store):
    def grab(pattern, hook):
        store[hook.name] = pattern.detach().clone()

    return [(f"blocks.{layer}.attn.hook_pattern", grab) for layer in range(model.n_layers)]


# ------------------------------------------------------------------------------------------ parsing


def test_parse_block_accepts_region_names():
    assert parse_block("Image->Question") == Block(source="Image", target="Question")
    assert parse_block(" Related Image Patches -> Question ") == Block("Related Image Patches", "Question")
    assert str(parse_block("Last->Last")) == "Last->Last"
    assert parse_block("True Option->Last", extra_names=["True Option"]).source == "True Option"


@pytest.mark.parametrize("text", ["Image->", "->Last", "Foo->Last", "", "Image-Question", "Image->Last->Last"])
def test_parse_block_errors_list_valid_names(text):
    with pytest.raises(MMLensError) as err:
        parse_block(text)
    message = str(err.value)
    assert repr(text) in message
    for name in REGION_NAMES:
        assert name in message


# --------------------------------------------------------------------------------------- semantics


def test_hook_point_is_pre_softmax_scores(tiny_llava, make_image):
    input_ids, kwargs, _ = encode(tiny_llava, make_image())
    shapes = {}

    def record(scores, hook):
        shapes[hook.name] = (tuple(scores.shape), bool((scores.exp().sum(-1) - 1).abs().max() > 1e-3))

    run(tiny_llava, input_ids, kwargs, [(hook_name(1), record)])
    shape, not_probabilities = shapes[hook_name(1)]
    n_heads = tiny_llava.bridge.cfg.n_heads
    assert shape == (1, n_heads, input_ids.shape[1], input_ids.shape[1])  # batch head q_pos k_pos
    assert not_probabilities


def test_empty_knockout_changes_nothing(tiny_llava, make_image):
    input_ids, kwargs, image_pos = encode(tiny_llava, make_image())
    layers = range(tiny_llava.n_layers)
    base = run(tiny_llava, input_ids, kwargs)
    assert knockout_hooks([], layers) == []
    no_targets = knockout_hooks([([], image_pos)], layers)
    no_sources = knockout_hooks([([input_ids.shape[1] - 1], [])], layers)
    assert len(no_targets) == tiny_llava.n_layers
    assert torch.equal(run(tiny_llava, input_ids, kwargs, no_targets), base)
    assert torch.equal(run(tiny_llava, input_ids, kwargs, no_sources), base)


@pytest.mark.parametrize("which", ["tiny_llava", "tiny_llava_next"])
def test_knocked_out_weights_are_zero_and_rows_renormalise(which, request, make_image):
    model = request.getfixturevalue(which)
    input_ids, kwargs, image_pos = encode(model, make_image(48, 32))
    seq = input_ids.shape[1]
    targets = list(range(image_pos[-1] + 1, seq))
    layers = [1, 2]
    patterns: dict = {}
    run(model, input_ids, kwargs, knockout_hooks([(targets, image_pos)], layers) + grab_patterns(model, patterns))
    for layer in range(model.n_layers):
        pattern = patterns[f"blocks.{layer}.attn.hook_pattern"][0]  # head q k
        blocked = pattern[:, targets][:, :, image_pos]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]), atol=1e-5, rtol=0)
        if layer in layers:
            assert torch.count_nonzero(blocked) == 0
            own = pattern[:, targets, targets]  # each target keeps its own position
            assert bool((own > 0).all())
        else:
            assert bool((blocked > 0).all())


def test_image_knockout_everywhere_makes_images_irrelevant(tiny_llava, make_image):
    ids_a, kw_a, image_pos = encode(tiny_llava, make_image(seed=1))
    ids_b, kw_b, image_pos_b = encode(tiny_llava, make_image(seed=2))
    assert torch.equal(ids_a, ids_b) and image_pos == image_pos_b
    later = list(range(image_pos[-1] + 1, ids_a.shape[1]))
    hooks = knockout_hooks([(later, image_pos)], range(tiny_llava.n_layers))
    plain_a, plain_b = run(tiny_llava, ids_a, kw_a), run(tiny_llava, ids_b, kw_b)
    assert not torch.allclose(plain_a[0, -1], plain_b[0, -1])  # the images matter without the knockout
    ko_a, ko_b = run(tiny_llava, ids_a, kw_a, hooks), run(tiny_llava, ids_b, kw_b, hooks)
    torch.testing.assert_close(ko_a[0, later], ko_b[0, later], atol=1e-6, rtol=0)


def test_hooks_compose_with_user_hooks(tiny_llava, make_image):
    input_ids, kwargs, image_pos = encode(tiny_llava, make_image())
    last = input_ids.shape[1] - 1
    ko = knockout_hooks([([last], image_pos)], [2])
    alone = run(tiny_llava, input_ids, kwargs, ko)
    seen = {}

    def user_scores(scores, hook):  # runs after the knockout on the same hook point
        seen["scores"] = scores[0, :, last, image_pos].clone()

    def user_resid(resid, hook):  # a user's own edit elsewhere also takes effect
        seen["resid"] = True
        return resid * 1.0

    user = [(hook_name(2), user_scores), ("blocks.0.hook_resid_post", user_resid)]
    composed = run(tiny_llava, input_ids, kwargs, ko + user)
    assert seen["resid"] and bool(torch.isneginf(seen["scores"]).all())
    torch.testing.assert_close(composed, alone, atol=0, rtol=0)

    def zero_resid(resid, hook):
        return torch.zeros_like(resid)

    edited = run(tiny_llava, input_ids, kwargs, ko + [("blocks.3.hook_resid_post", zero_resid)])
    assert not torch.allclose(edited, alone)


def test_knockout_indexes_rows_relative_to_a_kv_cache(tiny_llava, make_image):
    """With a cache the score rows are the new positions only; absolute targets must still land right."""
    input_ids, kwargs, image_pos = encode(tiny_llava, make_image())
    seq = input_ids.shape[1]
    split = seq - 3
    targets = list(range(split - 2, seq))  # some targets in the prefix, some in the decoded part
    hooks = knockout_hooks([(targets, image_pos)], range(tiny_llava.n_layers))
    full = run(tiny_llava, input_ids, kwargs, hooks)
    bridge = tiny_llava.bridge
    with torch.inference_mode(), bridge.hooks(fwd_hooks=hooks):
        _, cache = bridge(input_ids[:, :split], return_type="logits_and_cache", **kwargs)
        step, _ = bridge(input_ids[:, split:], return_type="logits_and_cache", past_key_values=cache)
    torch.testing.assert_close(step[0], full[0, split:], atol=1e-5, rtol=1e-5)
    plain = run(tiny_llava, input_ids, kwargs)
    assert not torch.allclose(plain[0, split:], full[0, split:], atol=1e-4)


def test_last_to_last_keeps_earlier_sources(tiny_llava, make_image):
    input_ids, kwargs, _ = encode(tiny_llava, make_image())
    last = input_ids.shape[1] - 1
    patterns: dict = {}
    run(tiny_llava, input_ids, kwargs, knockout_hooks([([last], [last])], [0]) + grab_patterns(tiny_llava, patterns))
    row = patterns["blocks.0.attn.hook_pattern"][0, :, last]
    assert torch.count_nonzero(row[:, last]) == 0
    torch.testing.assert_close(row.sum(-1), torch.ones(row.shape[0]), atol=1e-5, rtol=0)


def test_emptying_a_row_raises_naming_the_edge():
    with pytest.raises(MMLensError, match="Last->Last.*position 0"):
        knockout_hook([0], [0], name="Last->Last")
    with pytest.raises(MMLensError, match="position 3"):
        knockout_hooks([([3], [0, 1]), ([3], [2, 3])], [0])  # together the two edges empty row 3
    knockout_hooks([([3], [0, 1]), ([3], [3])], [0])  # position 2 still visible: fine
    with pytest.raises(MMLensError, match=">= 0"):
        knockout_hook([1], [-1])


def test_block_hooks_resolve_names_through_region_map(tiny_llava, make_image):
    class Regions:  # the part of RegionMap that block_hooks uses
        spans: dict = {}

        def __init__(self, positions):
            self._positions = positions

        def positions(self, name):
            return self._positions[name]

    input_ids, kwargs, image_pos = encode(tiny_llava, make_image())
    last = input_ids.shape[1] - 1
    regions = Regions({"Image": image_pos, "Last": [last], "Question": [last - 3, last - 2]})
    hooks = block_hooks(regions, "Image->Last", [1])
    assert [name for name, _ in hooks] == [hook_name(1)]
    patterns: dict = {}
    run(tiny_llava, input_ids, kwargs, hooks + grab_patterns(tiny_llava, patterns))
    assert torch.count_nonzero(patterns[hook_name(1).replace("attn_scores", "pattern")][0, :, last, image_pos]) == 0
    assert bool((patterns[hook_name(1).replace("attn_scores", "pattern")][0, :, last - 2, image_pos] > 0).all())
    with pytest.raises(MMLensError, match="Foo"):
        block_hooks(regions, "Foo->Last", [1])
