"""Head-level knockout: all heads = the block knockout; one head = an attention mask edited in that head only,
recomputed with plain transformers (eager attention); the head sweep's rows; clear errors."""

from __future__ import annotations

import pytest
import torch

from mm_lens.errors import MMLensError
from mm_lens.heads import HEAD_COLUMNS, head_sweep, n_heads
from mm_lens.inputs import prepare
from mm_lens.knockout import block_hooks

QUESTION = "What color is the ball?"
EDGE = "Image->Last"


@pytest.fixture(scope="module")
def plain_llava(tiny_llava_path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_llava_path, attn_implementation="eager").eval()


def plain_prob_with_head_mask(hf, inp, layer: int, head: int, targets, sources, token: int) -> float:
    """Last-position probability of `token` with (target, source) masked in one head of one layer."""
    attn = hf.model.language_model.layers[layer].self_attn
    original = attn.forward

    def forward(*args, **kwargs):
        mask = kwargs["attention_mask"]
        n = hf.config.text_config.num_attention_heads
        edited = mask.expand(mask.shape[0], n, *mask.shape[-2:]).clone()
        rows = torch.tensor(targets)[:, None]
        cols = torch.tensor(sources)[None, :]
        edited[0, head, rows, cols] = torch.finfo(edited.dtype).min
        kwargs["attention_mask"] = edited
        return original(*args, **kwargs)

    attn.forward = forward
    try:
        with torch.no_grad():
            logits = hf(**inp.model_kwargs(), input_ids=inp.input_ids).logits
    finally:
        del attn.forward
    return float(logits[0, -1].softmax(-1)[token])


def test_all_heads_equal_the_block_knockout(tiny_llava, make_image):
    inp = prepare(tiny_llava, make_image(seed=3), QUESTION)
    input_ids, kwargs = inp.forward_args()
    every = list(range(n_heads(tiny_llava)))
    with torch.inference_mode():
        whole = tiny_llava.bridge.run_with_hooks(input_ids, fwd_hooks=block_hooks(inp.regions, EDGE, [1, 2]), **kwargs)
        heads = tiny_llava.bridge.run_with_hooks(
            input_ids, fwd_hooks=block_hooks(inp.regions, EDGE, [1, 2], heads=every), **kwargs
        )
    assert torch.equal(whole, heads)


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_one_head_equals_a_mask_edited_in_that_head(tiny_llava, plain_llava, make_image, engine):
    inp = prepare(tiny_llava, make_image(seed=5), QUESTION)
    table = head_sweep(tiny_llava, inp, EDGE, layers=[0, 2], engine=engine, question_id="q")
    assert list(table.columns) == HEAD_COLUMNS
    assert len(table) == 2 * n_heads(tiny_llava)
    with torch.inference_mode():
        probs = tiny_llava.bridge(*inp.forward_args()[:1], **inp.model_kwargs())[0, -1].softmax(-1)
    token = int(probs.argmax())
    targets, sources = inp.regions.positions("Last"), inp.regions.positions("Image")
    moved = 0
    for row in table.itertuples():
        want = plain_prob_with_head_mask(plain_llava, inp, row.layer, row.head, targets, sources, token)
        assert row.knockout_prob == pytest.approx(want, rel=1e-5), (row.layer, row.head)
        moved += abs(want - row.base_prob) / row.base_prob > 1e-4
    assert moved, "no single-head knockout changed anything: the comparison would test nothing"


def test_head_sweep_defaults_to_the_strongest_window_and_checks_heads(tiny_llava, make_image):
    inp = prepare(tiny_llava, make_image(seed=6), QUESTION)
    table = head_sweep(tiny_llava, inp, EDGE, heads=[0, 1])
    layers = sorted(set(table["layer"]))
    assert layers == list(range(layers[0], layers[-1] + 1)) and set(table["head"]) == {0, 1}
    with pytest.raises(MMLensError, match="head 99 is out of range"):
        head_sweep(tiny_llava, inp, EDGE, layers=[0], heads=[99])
    input_ids, kwargs = inp.forward_args()
    with pytest.raises(MMLensError, match="out of range"), torch.inference_mode():
        tiny_llava.bridge.run_with_hooks(input_ids, fwd_hooks=block_hooks(inp.regions, EDGE, [0], heads=[99]), **kwargs)
