"""Related / other image patches from boxes, through the model's own preprocessing (tiny and real-scale)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import LLAVA15_CHAT_TEMPLATE, build_tokenizer
from mm_lens import patches
from mm_lens.data.gqa import TASKS, Box, SampleSkip, check_sample, load_task
from mm_lens.errors import MMLensError
from mm_lens.inputs import prepare
from mm_lens.model import HookedLlava

QUESTION = "What color is the ball?"
REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def grey(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (120, 120, 120))


def coords(regions, positions) -> set[tuple[int, int, int]]:
    """(tile, row, col) of image tokens at ``positions``."""
    index = {p: i for i, p in enumerate(regions.image_positions)}
    return {(regions.patch_tile[index[p]], regions.patch_row[index[p]], regions.patch_col[index[p]]) for p in positions}


def patch_positions(regions) -> list[int]:
    return [
        p for p, nl, box in zip(regions.image_positions, regions.is_newline, regions.patch_box, strict=False)
        if not nl and box
    ]


def check_partition(regions, found: patches.PatchSets) -> None:
    """related, other and padding are disjoint and together are exactly the patch tokens."""
    related, other, padding = set(found.related), set(found.other), set(found.padding)
    assert not related & other and not related & padding and not other & padding
    assert related | other | padding == set(patch_positions(regions))
    newlines = {p for p, nl in zip(regions.image_positions, regions.is_newline, strict=False) if nl}
    assert not newlines & (related | other)


# --------------------------------------------------------------------------------- real-scale models


def config_only_model(model_type: str, tmp_path_factory) -> HookedLlava:
    """A HookedLlava with the image settings of llava-hf/llava-1.5-7b-hf or llava-v1.6-vicuna-7b-hf, built on
    the meta device (no weights): enough for prepare() and the region map, not for a forward pass."""
    import transformers as tf

    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tok"))
    vision = tf.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=336, patch_size=14, projection_dim=16,
    )
    text = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2)
    common = dict(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                  vision_feature_select_strategy="default", vision_feature_layer=-2)
    image_kwargs = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
                        resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                        image_std=[0.26862954, 0.26130258, 0.27577711])
    with torch.device("meta"):
        if model_type == "llava":
            hf = tf.LlavaForConditionalGeneration(tf.LlavaConfig(**common))
            image_processor = tf.CLIPImageProcessor(**image_kwargs)
            processor_cls = tf.LlavaProcessor
        else:
            hf = tf.LlavaNextForConditionalGeneration(tf.LlavaNextConfig(image_grid_pinpoints=REAL_PINPOINTS, **common))
            image_processor = tf.LlavaNextImageProcessor(image_grid_pinpoints=REAL_PINPOINTS, **image_kwargs)
            processor_cls = tf.LlavaNextProcessor
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA15_CHAT_TEMPLATE)
    return HookedLlava(bridge=SimpleNamespace(original_model=hf), processor=processor, model_type=model_type,
                       name=f"config-only {model_type}")


@pytest.fixture(scope="module")
def real_llava(tmp_path_factory):
    return config_only_model("llava", tmp_path_factory)


@pytest.fixture(scope="module")
def real_llava_next(tmp_path_factory):
    return config_only_model("llava_next", tmp_path_factory)


def expanded_image_tokens(model, image, prompt) -> list[int]:
    """Positions the processor itself fills with image tokens when it expands ``<image>``."""
    ids = model.processor(images=image, text=prompt, return_tensors="pt")["input_ids"][0]
    return (ids == model.config.image_token_id).nonzero().flatten().tolist()


@pytest.mark.parametrize("size", [(336, 336), (800, 400), (375, 500)], ids=["square", "wide", "tall"])
def test_real_scale_llava15_layout(real_llava, size):
    image = grey(*size)
    inp = prepare(real_llava, image, QUESTION)
    r = inp.regions
    assert len(r.image_positions) == 576 == len(expanded_image_tokens(real_llava, image, inp.prompt))
    assert r.image_positions == expanded_image_tokens(real_llava, image, inp.prompt)
    found = patches.patch_sets(real_llava, size, r, [Box(0, 0, *size)])
    assert len(found.related) == 576 and found.other == [] and found.padding == []


@pytest.mark.parametrize(
    "size, expected",
    [((672, 672), 2928), ((336, 336), 1176), ((500, 500), None), ((1000, 400), None), ((375, 500), None),
     ((300, 1000), None)],
    ids=["square-672", "square-336", "square-500", "wide", "tall", "very-tall"],
)
def test_real_scale_llava_next_layout(real_llava_next, size, expected):
    image = grey(*size)
    inp = prepare(real_llava_next, image, QUESTION)
    r = inp.regions
    processor_positions = expanded_image_tokens(real_llava_next, image, inp.prompt)
    assert r.image_positions == processor_positions
    if expected is not None:  # 576 base tokens + unpadded any-res grid with one separator per row
        assert len(r.image_positions) == expected
    tiles = inp.pixel_values.shape[1]
    assert set(r.patch_tile) == set(range(tiles))
    whole = patches.patch_sets(real_llava_next, size, r, [Box(0, 0, *size)])
    check_partition(r, whole)
    assert whole.other == [] and len(whole.related) == len(patch_positions(r)) - len(whole.padding)
    assert sum(r.is_newline) > 0


def test_real_scale_quarter_boxes(real_llava, real_llava_next):
    # 500x375 on LLaVA-1.5: resize to 448x336, centre crop 336 -> original x in [62.5, 437.5], y in [0, 375].
    r = prepare(real_llava, grey(500, 375), QUESTION).regions
    top_left = patches.patch_sets(real_llava, (500, 375), r, [Box(62.5, 0, 187.5, 187.5)])
    assert coords(r, top_left.related) == {(0, row, col) for row in range(12) for col in range(12)}
    # 672x672 on LLaVA-NeXT: 2x2 tiles of 336 px; the bottom-right quarter is tile 4, and base rows/cols 12..23.
    r = prepare(real_llava_next, grey(672, 672), QUESTION).regions
    quarter = patches.patch_sets(real_llava_next, (672, 672), r, [Box(336, 336, 336, 336)])
    base = {(0, row, col) for row in range(12, 24) for col in range(12, 24)}
    tile4 = {(4, row, col) for row in range(24) for col in range(24)}
    assert coords(r, quarter.related) == base | tile4


# ------------------------------------------------------------------------------ tiny models, by hand

TINY_QUARTERS = {
    # LLaVA-1.5 tiny: shortest edge -> 32, centre crop 32, patch 8 (4x4 grid).
    ("llava", (32, 32)): {(0, r, c) for r in (0, 1) for c in (0, 1)},
    # wide 64x32: crop keeps x in [16, 48); the top-left quarter [0,32)x[0,16) shows as x [16,32) -> cols 0,1.
    ("llava", (64, 32)): {(0, r, c) for r in (0, 1) for c in (0, 1)},
    # tall 40x60: resize to 32x48, crop keeps y in [10, 50); [0,20)x[0,30) shows as rows 0,1 and cols 0,1.
    ("llava", (40, 60)): {(0, r, c) for r in (0, 1) for c in (0, 1)},
    # LLaVA-NeXT tiny (pinpoints 32x64, 64x32, 64x64): base tile = image squashed to 32x32 -> rows/cols 0,1.
    # 32x32 -> canvas 32 high x 64 wide, image centred (x 16..48): the quarter is tile 1, cols 2,3, rows 0,1.
    ("llava_next", (32, 32)): {(0, r, c) for r in (0, 1) for c in (0, 1)} | {(1, r, c) for r in (0, 1) for c in (2, 3)},
    # 64x32 -> canvas 32x64 exactly (tiles 1 | 2): the quarter x [0,32) y [0,16) is tile 1 rows 0,1, all cols.
    ("llava_next", (64, 32)): (
        {(0, r, c) for r in (0, 1) for c in (0, 1)} | {(1, r, c) for r in (0, 1) for c in range(4)}
    ),
    # 40x60 -> canvas 64x64 (2x2 tiles), image resized to 43x64 and padded 10 px left: the quarter is
    # x [10, 31.5) y [0, 32) -> tile 1, all rows, cols 1..3 (col 0 is padding and unpadded away).
    ("llava_next", (40, 60)): (
        {(0, r, c) for r in (0, 1) for c in (0, 1)} | {(1, r, c) for r in range(4) for c in (1, 2, 3)}
    ),
}


@pytest.fixture(params=["llava", "llava_next"])
def tiny(request):
    return request.param, request.getfixturevalue("tiny_llava" if request.param == "llava" else "tiny_llava_next")


@pytest.mark.parametrize("size", [(32, 32), (64, 32), (40, 60)], ids=["square", "wide", "tall"])
def test_tiny_quarter_maps_to_expected_patches(tiny, size):
    kind, model = tiny
    w, h = size
    image = grey(w, h)
    inp = prepare(model, image, QUESTION, boxes=[Box(0, 0, w / 2, h / 2, "quarter")])
    r = inp.regions
    assert coords(r, r.related) == TINY_QUARTERS[(kind, size)]
    found = patches.patch_sets(model, image.size, r, [Box(0, 0, w / 2, h / 2)])
    check_partition(r, found)
    assert sorted(r.related) == found.related and sorted(r.other) == found.other


@pytest.mark.parametrize("size", [(32, 32), (64, 32), (40, 60), (20, 64)])
def test_whole_image_box_relates_every_non_padding_patch(tiny, size):
    _, model = tiny
    r = prepare(model, grey(*size), QUESTION).regions
    found = patches.patch_sets(model, size, r, [Box(0, 0, *size)])
    check_partition(r, found)
    assert found.other == [] and found.related == [p for p in patch_positions(r) if p not in found.padding]


def test_box_cropped_away_is_reported_not_empty(tiny_llava, tiny_llava_next):
    box = Box(0, 0, 10, 32, "post")  # the left 10 px of a 64x32 image: LLaVA-1.5's crop keeps x in [16, 48)
    with pytest.raises(SampleSkip, match=r"post .* lies outside the centre crop") as err:
        prepare(tiny_llava, grey(64, 32), QUESTION, boxes=[box])
    assert err.value.kind == patches.CROPPED_KIND
    assert err.value.record("q7").question_id == "q7"
    # LLaVA-NeXT's base tile shows the whole image, so the same box is seen there.
    r = prepare(tiny_llava_next, grey(64, 32), QUESTION, boxes=[box]).regions
    assert r.related and {t for t, _, _ in coords(r, r.related)} == {0, 1}


def test_one_of_two_boxes_cropped_away_keeps_the_other(tiny_llava):
    r = prepare(tiny_llava, grey(64, 32), QUESTION).regions
    lost, kept = Box(0, 0, 10, 32, "lost"), Box(40, 24, 6, 6, "kept")
    found = patches.patch_sets(tiny_llava, (64, 32), r, [lost, kept])
    assert found.lost_boxes == (lost,)
    assert coords(r, found.related) == {(0, 3, 3)}  # x [40,46) -> crop x [24,30) col 3; y [24,30) row 3


def test_padding_patches_belong_to_neither(tiny_llava):
    """LLaVA-1.5 with pad-to-square: a 64x32 image is padded to 64x64, so rows 0 and 3 of 4 are padding."""
    import transformers as tf

    padded = tf.LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 32},
                                       crop_size={"height": 32, "width": 32})
    r = prepare(tiny_llava, grey(32, 32), QUESTION).regions  # same 4x4 layout as any 32 px tile
    found = patches.patch_sets(padded, (64, 32), r, [Box(0, 0, 64, 32)])
    check_partition(r, found)
    assert coords(r, found.padding) == {(0, row, c) for row in (0, 3) for c in range(4)}
    assert coords(r, found.related) == {(0, row, c) for row in (1, 2) for c in range(4)}
    small = patches.patch_sets(padded, (64, 32), r, [Box(0, 0, 16, 8)])
    assert coords(r, small.related) == {(0, 1, 0)} and len(small.other) == 7


def test_thin_box_is_never_lost_to_the_resize_stride(real_llava):
    """A 2 px box on a 1280x960 image (stride ~2.9 px) still relates exactly one patch column / row."""
    r = prepare(real_llava, grey(1280, 960), QUESTION).regions
    for x in range(600, 606):
        found = patches.patch_sets(real_llava, (1280, 960), r, [Box(x, 500, 2, 2)])
        assert 1 <= len(found.related) <= 4


def test_geometry_of_clip_centre_crop():
    import transformers as tf

    clip = tf.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    (tile,) = patches.image_geometry(clip, 500, 375)
    assert tile.shape == (336, 336) and tile.rows.valid.all() and tile.cols.valid.all()
    assert tile.rows.lo[0] == pytest.approx(0, abs=0.6) and tile.rows.hi[-1] == pytest.approx(375, abs=0.6)
    assert tile.cols.lo[0] == pytest.approx(62.5, abs=1.1) and tile.cols.hi[-1] == pytest.approx(437.5, abs=1.1)
    assert (tile.cols.lo[1:] == tile.cols.hi[:-1]).all()  # the strips partition the visible image


def test_bad_boxes_are_input_errors(tiny_llava):
    r = prepare(tiny_llava, grey(32, 32), QUESTION).regions
    with pytest.raises(MMLensError, match="has no area"):
        patches.patch_sets(tiny_llava, (32, 32), r, [Box(1, 1, 0, 5)])
    with pytest.raises(SampleSkip, match="lies outside the 32x32 image"):
        patches.patch_sets(tiny_llava, (32, 32), r, [(40, 1, 5, 5)])
    with pytest.raises(MMLensError, match="not \\(x, y, w, h\\)"):
        patches.patch_sets(tiny_llava, (32, 32), r, [("a", 1, 5, 5)])
    with pytest.raises(SampleSkip, match="no object box"):
        patches.patch_sets(tiny_llava, (32, 32), r, [])
    clipped = patches.patch_sets(tiny_llava, (32, 32), r, [(24, 24, 100, 100)])
    assert coords(r, clipped.related) == {(0, 3, 3)}


def test_region_names_and_study_aliases(tiny_llava_next):
    inp = prepare(tiny_llava_next, grey(40, 60), QUESTION, boxes=[Box(5, 5, 10, 10)])
    r = inp.regions
    assert r.positions("Related Image Patches") == r.positions("Image Central Object") == r.related
    assert r.positions("Other Image Patches") == r.positions("Image Without Central Object") == r.other
    assert set(r.related) | set(r.other) <= set(r.positions("Image"))


# ------------------------------------------------------------------------------- the six task sets

ROWS_PER_TASK = 12


def visible_on_llava15(sample: Box, w: int, h: int, margin: float = 2.0) -> str:
    """'in' / 'out' / 'edge': where a box lies relative to CLIP's shortest-edge resize + centre crop."""
    long, short = max(w, h), min(w, h)
    lo = (long - short) / 2  # the crop keeps the central short x short square of the original
    hi = lo + short
    a, b = (sample.x, sample.x1) if w >= h else (sample.y, sample.y1)
    if min(b, hi) - max(a, lo) >= margin:
        return "in"
    if b <= lo - margin or a >= hi + margin:
        return "out"
    return "edge"


@pytest.mark.parametrize("task", TASKS)
def test_task_rows_map_to_patches(task, real_llava, tiny_llava_next):
    samples = load_task(task)
    step = len(samples) // ROWS_PER_TASK
    rows = samples[::step][:ROWS_PER_TASK]
    llava_regions = prepare(real_llava, grey(336, 336), QUESTION).regions  # LLaVA-1.5's layout is size-free
    for s in rows:
        if s.box_problem:
            with pytest.raises(SampleSkip):
                check_sample(s)
            continue
        image = grey(s.image_w, s.image_h)
        # LLaVA-1.5 (real scale): non-empty unless every box is cut away by the centre crop.
        where = [visible_on_llava15(b, s.image_w, s.image_h) for b in s.boxes]
        try:
            found = patches.patch_sets(real_llava, image.size, llava_regions, s.boxes)
        except SampleSkip as err:
            assert "centre crop" in err.reason and "in" not in where, (s.question_id, where)
        else:
            check_partition(llava_regions, found)
            assert found.related and set(where) != {"out"}, (s.question_id, where)
            assert all(w != "in" for b, w in zip(s.boxes, where, strict=False) if b in found.lost_boxes)
        # LLaVA-NeXT (tiny): the base tile shows the whole image, so every box is seen.
        inp = prepare(tiny_llava_next, image, s.question, boxes=s.boxes)
        assert inp.regions.related, s.question_id
        assert {t for t, _, _ in coords(inp.regions, inp.regions.related)} >= {0}


def test_real_row_with_box_in_the_cropped_margin():
    (s,) = [x for x in load_task("ChooseAttr") if x.question_id == "16364734"]  # fan at x 1..39 of 500x375
    import transformers as tf

    clip = tf.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    geometry = patches.image_geometry(clip, s.image_w, s.image_h)
    tokens = [patches.TokenPatch(i, 0, r * 14, r * 14 + 14, c * 14, c * 14 + 14) for i, (r, c) in
              enumerate((r, c) for r in range(24) for c in range(24))]
    with pytest.raises(SampleSkip, match="fan .* lies outside the centre crop"):
        patches.split_patches(geometry, tokens, s.boxes)


def test_patches_figure_outlines_the_related_patches(tiny_llava_next):
    from mm_lens.plots import patches_figure

    image, box = grey(64, 32), Box(0, 0, 32, 16, "quarter")
    r = prepare(tiny_llava_next, image, QUESTION).regions
    found = patches.patch_sets(tiny_llava_next, image.size, r, [box])
    fig = patches_figure(image, found, boxes=[box])
    traces = {t.name.split(" (")[0]: t for t in fig.data}
    assert set(traces) == {"image", "other patches", "related patches", "object boxes"}
    related = traces["related patches"]
    # "auto" draws the any-res tiles: tile 1, rows 0-1, 4 cols -> 8 rectangles of 6 path points each
    assert related.name == "related patches (8)" and len(related.x) == 8 * 6
    # the tile patches are 8x8 processed px = 8x8 original px here; the top-left one is [0, 8) x [0, 8)
    assert (min(v for v in related.x if v is not None), max(v for v in related.y if v is not None)) == (-0.5, 15.5)
    base = patches_figure(image, found, tiles="base")
    assert [t.name for t in base.data if t.name.startswith("related")] == ["related patches (4)"]
    with pytest.raises(MMLensError, match="tiles="):
        patches_figure(image, found, tiles="some")
    fig.to_json()
