"""mm-lens under ``protocol="study"`` against an independent re-implementation of the study's pipeline.

``tests/study_reference.py`` re-implements, from the study's own code (FightingFighting/cross-modal-information-
flow-in-MLLM + the LLaVA-NeXT code it imports), the prompt, ``tokenizer_image_token``, ``process_images``, the
red-box patch rule, ``blockdesc2range``, the attention knockout of ``methods.py``, the greedy answer and the lens of
``last_position_answer_prob.py``, on the plain HF checkpoints. Here mm-lens must agree with it on the study
checkpoints (tiny random weights, the real Llama-2 / Llama-3 tokenizers, 336 px / patch 14 geometry):

* the same input ids, token for token, for LLaVA-1.5, LLaVA-NeXT-Vicuna and LLaVA-NeXT-Llama-3;
* the same pixel values (max abs diff <= 1e-3) and the same Image / Question / Last / option positions;
* the same related / other patches for boxes of several shapes on images of several sizes;
* the same greedy answer, knockout probabilities and lens probabilities within 1e-4 RELATIVE (every
  probability of a random model over a real vocabulary is ~1e-5..1e-3: an absolute tolerance tests nothing);
* the same through the CLI (``--protocol study``): correctly answered rows kept, the others dropped.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import study_reference as R

REL = 1e-4
KINDS = {
    "llava15": ("study_llava15", "study_llava15_path"),
    "next_vicuna": ("study_next_vicuna", "study_next_vicuna_path"),
    "next_llama3": ("study_next_llama3", "study_next_llama3_path"),
}
NEXT_KINDS = ("next_vicuna", "next_llama3")

# Image sizes (width, height): GQA-typical landscape / portrait, 4:3, square (no resize; for NeXT the square also
# hits the study's pinpoint tie-break: LLaVA-NeXT reads [336, 672] as (width, height) and picks a tall 1x2 grid,
# where HF's (height, width) reading picks a wide one), a very wide image, and 376x799 where LLaVA-NeXT's
# ``unpad_image`` keeps int(50.99999) = 50 rows of the grid and HF's ``round(.., 7)`` keeps 52.
SIZES = [(500, 375), (375, 500), (640, 480), (336, 336), (1000, 300), (376, 799)]
QUESTIONS = [
    ("Is the ball red or blue?", "red", "blue", "ball"),
    ("Which color is the car, white or black?", "white", "black", "car"),
    ("What is the man's shirt made of, cotton or wool?", "cotton", "wool", "shirt"),
]
TEXT_REGIONS = (
    "Image", "Question", "Last", "True Option", "False Option", "Central Object", "Question without Options"
)

# mm-lens region -> the study's name (blockdesc2range_patches)
PATCH_NAMES = {
    "Related Image Patches": "Image Central Object",
    "Other Image Patches": "Image Without Central Object",
}
NEXT_PATCH_NAMES = {
    "Base Image": "Image Original Patch",
    "HD Image": "Image HD Patch Indice",
    "Related HD Patches": "Image Central Object in HD Patch Indice",
    "Other HD Patches": "Image HD Patch Without Central Object Indice",
}


def boxes_for(name: str, w: int, h: int) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) as the study draws them: ``(x, y, x + w, y + h)``, both corners inclusive (ImageDraw)."""
    frac = {
        "small": (0.40, 0.40, 0.48, 0.47),
        "wide": (0.05, 0.45, 0.95, 0.55),
        "tall": (0.45, 0.05, 0.55, 0.95),
        "top-left border": (0.0, 0.0, 0.2, 0.15),
    }
    if name in frac:
        fx0, fy0, fx1, fy1 = frac[name]
        return [(int(fx0 * w), int(fy0 * h), int(fx1 * w), int(fy1 * h))]
    if name == "bottom-right border":  # GQA boxes may end on the image edge: x + w == width
        return [(int(0.8 * w), int(0.85 * h), w, h)]
    if name == "whole image":
        return [(0, 0, w, h)]
    if name == "patch-aligned":  # on 336x336 (LLaVA-1.5: no resize) x1 = y1 = 28 is the first pixel of patch 2
        return [(14, 14, 28, 28)]
    if name == "two boxes":
        return boxes_for("small", w, h) + boxes_for("bottom-right border", w, h)
    raise KeyError(name)


def as_xywh(boxes):
    """GQA's (x, y, w, h), which mm-lens takes, for corners the study draws as (x, y, x + w, y + h)."""
    return [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes]


BOXES = ("small", "wide", "tall", "top-left border", "bottom-right border", "whole image", "patch-aligned", "two boxes")


def make_test_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: resizing and padding matter at every pixel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 100 * np.sin((x + y) / 23.0)], -1)
    noisy = base + rng.normal(0, 25, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")


def layout_differs(kind: str, size: tuple[int, int]) -> bool:
    """Sizes where the study's LLaVA-NeXT code and transformers lay the image out differently."""
    return kind in NEXT_KINDS and size in ((336, 336), (376, 799))


def assert_rel(actual, expected, what: str, rel: float = REL) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected) / np.abs(expected)
    worst = int(np.argmax(err)) if err.size else 0
    if err.size:
        print(f"agreement {what}: max relative difference {err.max():.2e} over {err.size} values")  # pytest -s
    assert err.size == 0 or err.max() <= rel, (
        f"{what}: relative error {err.max():.3g} > {rel:g} "
        f"(mm-lens {actual.flat[worst]!r}, study {expected.flat[worst]!r})"
    )


# ------------------------------------------------------------------------------------------------ fixtures

_REFERENCES: dict[str, R.StudyModel] = {}


def reference_model(request, kind: str) -> R.StudyModel:
    if kind not in _REFERENCES:
        _REFERENCES[kind] = R.load_study_model(request.getfixturevalue(KINDS[kind][1]))
    return _REFERENCES[kind]


@pytest.fixture(params=list(KINDS))
def pair(request):
    """(kind, mm-lens model, reference model)."""
    kind = request.param
    return kind, request.getfixturevalue(KINDS[kind][0]), reference_model(request, kind)


@pytest.fixture(scope="module")
def computed() -> dict:
    """Per-kind cache of the shared sample's inputs and the reference's greedy answer."""
    return {}


SAMPLE_SIZE = (500, 375)
SAMPLE_QUESTION = QUESTIONS[0]
SAMPLE_BOX = [(180, 120, 320, 260)]


def shared_sample(kind, model, ref_model, computed):
    if kind not in computed:
        from mm_lens.inputs import prepare

        question, true, false, obj = SAMPLE_QUESTION
        image = make_test_image(*SAMPLE_SIZE, seed=11)
        spans = {"True Option": true, "False Option": false, "Central Object": obj}
        inp = prepare(model, image, question, spans=spans, boxes=as_xywh(SAMPLE_BOX), protocol="study")
        ref = R.prepare(ref_model, image, question, true, false, obj, boxes=SAMPLE_BOX)
        computed[kind] = (inp, ref, R.greedy_answer(ref_model, ref))
    return computed[kind]


# ------------------------------------------------------------------------------------------------ the reference itself


def test_reference_reproduces_the_study_layout(request):
    """Facts of the study's code the reference must show (no mm-lens involved)."""
    vicuna = R.study_prompt("vicuna_v1", "Is the ball red or blue?")
    assert vicuna == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nIs the ball red or blue? \n"
        "Answer the question using a single word or phrase. ASSISTANT:"
    )
    llama3 = R.study_prompt("llava_llama_3", "Is the ball red or blue?")
    assert llama3.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful")
    assert llama3.endswith(
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nIs the ball red or blue? \nAnswer the question using a "
        "single word or phrase.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
    )

    l15, l3 = reference_model(request, "llava15"), reference_model(request, "next_llama3")
    ids = R.tokenizer_image_token(vicuna, l15.tokenizer)
    at = ids.index(R.IMAGE_TOKEN_INDEX)
    assert ids[0] == 1 and ids[1] != 1
    assert ids[at + 1 : at + 3] == [29871, 13]  # the text after <image> tokenised alone: "▁", "<0x0A>"
    ids = R.tokenizer_image_token(llama3, l3.tokenizer)
    # The prompt already starts with <|begin_of_text|> and the Llama-3 tokenizer adds another: the study's ids
    # start with two BOS (tokenizer_image_token keeps the first chunk's ids whole after its first token).
    assert ids[:3] == [128000, 128000, 128006]
    assert ids[ids.index(R.IMAGE_TOKEN_INDEX) + 1] == 198  # "\n" (the later chunk's BOS dropped)

    nv = reference_model(request, "next_vicuna")
    assert R.n_image_features(l15, (500, 375)) == 576
    assert R.n_image_features(nv, (500, 375)) == 576 + 36 * 49  # 2x2 grid, 36 of 48 rows kept, + newline
    assert R.n_image_features(nv, (336, 336)) == 576 + 24 * 25  # tie-break: 1 wide x 2 tall, half the rows kept
    assert R.get_anyres_image_grid_shape((336, 336), nv.grid_pinpoints, 336) == (1, 2)
    assert R.n_image_features(nv, (376, 799)) == 576 + 50 * 25  # LLaVA-NeXT's unpad_image truncates
    from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad_image

    assert hf_unpad_image(torch.empty(1, 72, 24), (799, 376)).shape[1] == 52  # HF's rounds: the count differs


# ------------------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_tokens_pixels_and_positions_match_the_study(pair, size):
    from mm_lens.inputs import prepare

    kind, model, ref_model = pair
    if layout_differs(kind, size):
        pytest.skip("layout the HF model cannot reproduce: see test_next_layouts_hf_cannot_reproduce_are_skipped")
    for i, (question, true, false, obj) in enumerate(QUESTIONS if size == SIZES[0] else QUESTIONS[:1]):
        image = make_test_image(*size, seed=i)
        spans = {"True Option": true, "False Option": false, "Central Object": obj}
        inp = prepare(model, image, question, spans=spans, protocol="study")
        ref = R.prepare(ref_model, image, question, true, false, obj)
        assert inp.protocol is not None and inp.protocol.name == "study"

        got_ids = inp.input_ids[0].tolist()
        want_ids = ref.input_ids[0].tolist()
        if got_ids != want_ids:
            first = next(
                (j for j, (a, b) in enumerate(zip(got_ids, want_ids, strict=False)) if a != b),
                min(len(got_ids), len(want_ids)),
            )
            tok = ref_model.tokenizer
            pytest.fail(
                f"{kind} {size} {question!r}: input ids differ (mm-lens {len(got_ids)}, study {len(want_ids)} tokens) "
                f"from position {first}: mm-lens {tok.convert_ids_to_tokens(got_ids[first:first + 6])} vs study "
                f"{tok.convert_ids_to_tokens(want_ids[first:first + 6])}"
            )

        got_px = inp.pixel_values.detach().float().cpu()
        want_px = ref.pixel_values.float()
        tile = want_px.shape[-3:]
        got_px, want_px = got_px.reshape(-1, *tile), want_px.reshape(-1, *tile)
        assert got_px.shape == want_px.shape, (
            f"{kind} {size}: pixel tiles {tuple(got_px.shape)} != {tuple(want_px.shape)}"
        )
        diff = float((got_px - want_px).abs().max())
        assert diff <= 1e-3, f"{kind} {size}: pixel values differ by up to {diff:.4g}"

        for name in TEXT_REGIONS:
            got = sorted(inp.regions.positions(name))
            assert got == sorted(ref.regions[name]), f"{kind} {size} {question!r}: {name} positions differ"


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_related_patches_match_the_study(pair, size):
    from mm_lens.inputs import prepare

    kind, model, ref_model = pair
    if layout_differs(kind, size):
        pytest.skip("layout the HF model cannot reproduce: see test_next_layouts_hf_cannot_reproduce_are_skipped")
    question, true, false, obj = QUESTIONS[0]
    image = make_test_image(*size, seed=3)
    names = dict(PATCH_NAMES, **(NEXT_PATCH_NAMES if kind in NEXT_KINDS else {}))
    for box_name in BOXES:
        boxes = boxes_for(box_name, *size)
        inp = prepare(model, image, question, boxes=as_xywh(boxes), protocol="study")
        ref = R.prepare(ref_model, image, question, boxes=boxes)
        assert ref.regions["Image Central Object"], f"{box_name} on {size}: the study finds no related patch"
        for ours, theirs in names.items():
            got = sorted(inp.regions.positions(ours))
            want = sorted(ref.regions[theirs])
            if got != want:
                extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
                pytest.fail(
                    f"{kind} {size} box {box_name} {boxes}: {ours} differs from the study's {theirs!r}: "
                    f"{len(extra)} extra (first {extra[:5]}), {len(missing)} missing (first {missing[:5]})"
                )
        # the study's names are accepted as aliases
        assert sorted(inp.regions.positions("Image Central Object")) == sorted(ref.regions["Image Central Object"])
        assert sorted(inp.regions.positions("Image Without Central Object")) == sorted(
            ref.regions["Image Without Central Object"]
        )


# ------------------------------------------------------------------------------------------------ model outputs


def test_greedy_answer_matches_the_study(pair, computed):
    from mm_lens.sweep import greedy_answer

    kind, model, ref_model = pair
    inp, ref, want = shared_sample(kind, model, ref_model, computed)
    got = greedy_answer(model, inp)
    assert got.first_token == want.first_token, (
        f"{kind}: first answer token {got.first_token} != study {want.first_token}"
    )
    assert_rel(got.first_prob, want.first_prob, f"{kind}: base probability of the first answer token")
    assert got.text == want.text, f"{kind}: greedy answer {got.text!r} != study {want.text!r}"


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_knockout_sweep_matches_the_study(pair, computed, engine):
    from mm_lens.sweep import layer_sweep as sweep

    kind, model, ref_model = pair
    inp, ref, greedy = shared_sample(kind, model, ref_model, computed)
    blocks = ["Image->Question", "Question->Last"] + (
        ["Image Central Object->Question"] if kind != "next_llama3" else []
    )
    key = (kind, "sweep")
    if key not in computed:
        computed[key] = {b: R.knockout_sweep(ref_model, ref, b, window=3, greedy=greedy) for b in blocks}
    want = computed[key]
    table = sweep(model, inp, blocks, window=3, engine=engine)
    assert list(table.columns) == ["question_id", "block", "layer", "base_prob", "knockout_prob", "relative_change_pct"]
    got_blocks = list(dict.fromkeys(table["block"]))
    assert len(got_blocks) == len(blocks), f"{kind}: blocks {got_blocks} for {blocks}"
    for block, got_name in zip(blocks, got_blocks, strict=False):
        rows = table[table["block"] == got_name].sort_values("layer")
        ref_rows = want[block]
        assert rows["layer"].tolist() == [r["layer"] for r in ref_rows] == list(range(ref_model.n_layers))
        ref_ko = [r["knockout_prob"] for r in ref_rows]
        # the knockout must move the probability, or the comparison below would not test the mask
        assert max(abs(k - greedy.first_prob) / greedy.first_prob for k in ref_ko) > 10 * REL, (
            f"{block} changes nothing"
        )
        assert_rel(rows["base_prob"], [r["base_prob"] for r in ref_rows], f"{kind} {engine} {block}: base_prob")
        assert_rel(rows["knockout_prob"], ref_ko, f"{kind} {engine} {block}: knockout_prob")


def test_answer_lens_matches_the_study(pair, computed):
    from mm_lens.lens import answer_forms, answer_lens

    kind, model, ref_model = pair
    inp, ref, _ = shared_sample(kind, model, ref_model, computed)
    _, true, false, _ = SAMPLE_QUESTION
    table = answer_lens(model, inp, answer_forms(true, false))
    # ChooseAttr-like: the study tracks the true option as given and .capitalize()d, the false option likewise
    words = {"answer_lower": true, "answer_capitalized": true.capitalize(),
             "false_option_lower": false, "false_option_capitalized": false.capitalize()}
    want = pd.DataFrame(R.lens(ref_model, ref, words))
    assert sorted(table["layer"].unique()) == list(range(ref_model.n_layers + 1)), "L + 1 layers, 0 = embeddings"
    merged = want.merge(table, on=["layer", "form"], how="left", suffixes=("_study", "_mm"))
    assert not merged["prob_mm"].isna().any(), f"{kind}: lens rows missing: {merged[merged['prob_mm'].isna()]}"
    assert_rel(merged["prob_mm"], merged["prob_study"], f"{kind}: lens probabilities")


@pytest.mark.parametrize(
    "size", [(336, 336), (320, 240), (376, 799)], ids=["tie-336x336", "tie-320x240", "unpad-376x799"]
)
def test_next_layouts_hf_cannot_reproduce_are_skipped(request, size):
    """Where the study's any-res code and HF's differ, the HF model packs the features its own way.

    Images within one tile tie between the 1x2 and 2x1 grids, which the study breaks as (width, height) and
    transformers as (height, width); 376x799 keeps 50 rows in the study (``int``) and 52 in transformers
    (``round(.., 7)``). mm-lens cannot hand the HF model the study's layout, so the study protocol skips such a
    sample with a reason instead of analysing a different input (15 of the 5,525 shipped rows, all ties).
    """
    from mm_lens.data.gqa import SampleSkip
    from mm_lens.inputs import prepare

    model, ref_model = request.getfixturevalue("study_next_vicuna"), reference_model(request, "next_vicuna")
    question = QUESTIONS[0][0]
    image = make_test_image(*size, seed=5)
    ref = R.prepare(ref_model, image, question)
    checkpoint = prepare(model, image, question, protocol="checkpoint")
    study_rows, study_cols = R.get_anyres_image_grid_shape(size, ref_model.grid_pinpoints, 336)[::-1]
    assert ref.seq_len > 0 and checkpoint.input_ids.shape[1] > 0
    with pytest.raises(SampleSkip, match="lay out a") as skip:
        prepare(model, image, question, protocol="study")
    assert skip.value.kind == "study layout not reproducible"
    assert "--protocol checkpoint" in str(skip.value)
    assert (study_rows, study_cols) != (1, 1)


def test_shipped_next_layouts_the_study_protocol_skips():
    """Only small images (grid ties) of the shipped task sets differ, and none through unpad rounding."""
    import glob

    from mm_lens.encoders import _next_grid, _unpadded

    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    frames = [pd.read_csv(f) for f in sorted(glob.glob(str(Path(__file__).parents[1] / "mm_lens/data/gqa/*.csv")))]
    sizes = pd.concat(frames)[["image_w", "image_h"]].itertuples(index=False)
    differs = [
        (w, h)
        for w, h in sizes
        if _next_grid((w, h), pins, 336, True) != _next_grid((w, h), pins, 336, False)
        or _unpadded((w, h), *_next_grid((w, h), pins, 336, True), 24, True)
        != _unpadded((w, h), *_next_grid((w, h), pins, 336, False), 24, False)
    ]
    assert len(differs) == 15 and all(w <= 336 and h <= 336 for w, h in differs)
    assert _unpadded((376, 799), 3, 1, 24, True) == (50, 24) and _unpadded((376, 799), 3, 1, 24, False) == (52, 24)


# ------------------------------------------------------------------------------------------------ CLI

CLI_KINDS = ["llava15", "next_llama3"]
CLI_ROWS = {  # (question_id, img_id, size, question, central object, box x, y, w, h, gold = study answer?)
    "llava15": [
        ("q-001", "img1", (500, 375), "What color is the ball?", "ball", 180, 120, 140, 140, True),
        ("q-002", "img2", (375, 500), "Which side of the photo is the car on?", "car", 30, 300, 200, 150, False),
        ("q-003", "img3", (640, 480), "What is the man wearing?", "man", 300, 40, 120, 400, True),
    ],
    "next_llama3": [
        ("q-101", "img1", (500, 375), "What color is the ball?", "ball", 180, 120, 140, 140, True),
        ("q-102", "img2", (640, 480), "What is the man wearing?", "man", 300, 40, 120, 400, False),
    ],
}
CLI_BLOCKS = ["Image->Question", "Image Central Object->Question"]


@pytest.mark.parametrize("kind", CLI_KINDS)
def test_cli_flow_and_lens_with_the_study_protocol(request, tmp_path, kind):
    from mm_lens.cli import main

    path = request.getfixturevalue(KINDS[kind][1])
    ref_model = reference_model(request, kind)
    images = tmp_path / "images"
    images.mkdir()
    rows, want_flow, want_lens, kept = [], [], [], []
    for qid, img_id, (w, h), question, obj, x, y, bw, bh, right in CLI_ROWS[kind]:
        make_test_image(w, h, seed=len(rows) + 20).save(images / f"{img_id}.jpg", quality=90)
        image = Image.open(images / f"{img_id}.jpg").convert("RGB")  # as the study reads it
        box = [(x, y, x + bw, y + bh)]  # InformationFlow.py: (x, y, x + w, y + h)
        ref = R.prepare(ref_model, image, question, central_object=obj, boxes=box)
        greedy = R.greedy_answer(ref_model, ref)
        assert greedy.text, f"{qid}: the study's greedy answer is empty; pick another image"
        gold = greedy.text if right else "definitely not " + greedy.text
        rows.append({
            "question_id": qid, "img_id": img_id, "question": question, "answer": gold,
            "central object name": obj, "image_w": w, "image_h": h,
            "central object w": bw, "central object h": bh, "central object x": x, "central object y": y,
        })
        if not right:  # the study skips a sample whose greedy answer is not the gold one (flow and lens)
            continue
        kept.append(qid)
        for block in CLI_BLOCKS:
            for r in R.knockout_sweep(ref_model, ref, block, window=3, greedy=greedy):
                want_flow.append({"question_id": qid, **r})
        # QueryAttr-like task: the lens tracks answer.lower() and answer.capitalize()
        for r in R.lens(
            ref_model, ref, {"answer_lower": gold.lower(), "answer_capitalized": gold.lower().capitalize()}
        ):
            want_lens.append({"question_id": qid, **r})
    dataset = tmp_path / "QueryAttr.csv"
    with open(dataset, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    common = ["--model", str(path), "--dataset", str(dataset), "--images", str(images), "--protocol", "study",
              "--dtype", "float32"]
    flow_args = ["flow", *common, "--out", str(tmp_path / "flow"), "--window", "3"]
    for block in CLI_BLOCKS:
        flow_args += ["--block", block]
    assert main(flow_args) == 0
    flow = pd.read_csv(tmp_path / "flow" / "flow.csv", dtype={"question_id": str})
    assert sorted(flow["question_id"].unique()) == kept, "only correctly answered samples are swept"
    want = pd.DataFrame(want_flow)
    for qid in kept:
        got_q, want_q = flow[flow["question_id"] == qid], want[want["question_id"] == qid]
        got_blocks = list(dict.fromkeys(got_q["block"]))
        assert len(got_blocks) == len(CLI_BLOCKS), f"{qid}: blocks {got_blocks}"
        for block, got_name in zip(CLI_BLOCKS, got_blocks, strict=False):
            g = got_q[got_q["block"] == got_name].sort_values("layer")
            s = want_q[want_q["block"] == block].sort_values("layer")
            assert g["layer"].tolist() == s["layer"].tolist()
            assert_rel(g["base_prob"], s["base_prob"], f"CLI {kind} {qid} {block}: base_prob")
            assert_rel(g["knockout_prob"], s["knockout_prob"], f"CLI {kind} {qid} {block}: knockout_prob")

    assert main(["lens", *common, "--out", str(tmp_path / "lens")]) == 0
    lens = pd.read_csv(tmp_path / "lens" / "lens.csv", dtype={"question_id": str})
    assert sorted(lens["question_id"].unique()) == kept, "the study's lens also keeps correctly answered samples only"
    want = pd.DataFrame(want_lens)
    merged = want.merge(lens, on=["question_id", "layer", "form"], how="left", suffixes=("_study", "_mm"))
    assert not merged["prob_mm"].isna().any(), f"lens rows missing: {merged[merged['prob_mm'].isna()].head()}"
    assert_rel(merged["prob_mm"], merged["prob_study"], f"CLI {kind}: lens probabilities")
