"""The checks every family's tests run (`tests/test_family_<name>.py`), written once.

* `check_knockout_oracle`: both engines' knockout probabilities equal the plain transformers model with edited
  per-layer masks (`tests/oracle.py`) within 1e-5 relative, and some knockout moves the probability;
* `check_image_positions`: ``Image`` is exactly the image-feature positions of the processor's ``input_ids``,
  ``Image Markers`` are the other image-block tokens;
* `painted_features` / `check_related_by_painting`: the related patches of a box equal the features whose pixel
  rectangle sees the box painted into the image and sent through the processor;
* `check_flow_cli`: ``mm-lens flow`` end to end from a CSV and an images folder.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oracle import knockout_probability

REL = 1e-5


def check_knockout_oracle(model: Any, plain: Any, inp: Any, blocks: Sequence[Any], windows: Sequence[range],
                          heads: Sequence[int] | None = None, token: int | None = None) -> dict[str, float]:
    """Both engines against the oracle on every (block, window); returns the largest relative differences and the
    largest relative move of the probability by a knockout. Where the fast engine runs the language model layer
    by layer, its bridge path is checked too (``fast_bridge``)."""
    from mm_lens.engines import fast_engine, fast_path, reference_engine
    from mm_lens.knockout import Edge, edge_positions, parse_edge

    edges = [b if isinstance(b, Edge) else parse_edge(b, inp.regions.spans) for b in blocks]
    n_vocab = inp.vocab_size(model)
    input_ids, kwargs = inp.forward_args()
    with torch.inference_mode():
        clean_logits = model.bridge(input_ids, **kwargs)[0, -1]
    if token is None:
        token = int(clean_logits.argmax())
    clean = float(clean_logits[:n_vocab].float().softmax(-1)[token]) if n_vocab else float(
        clean_logits.float().softmax(-1)[token])
    got_by = {"fast": fast_engine(model, inp, edges, windows, token, heads=heads),
              "reference": reference_engine(model, inp, edges, windows, token, heads=heads)}
    if fast_path(model) == "layers":
        got_by["fast_bridge"] = fast_engine(model, inp, edges, windows, token, heads=heads, path="bridge")
    worst = dict.fromkeys([*got_by, "moved"], 0.0)
    for b, edge in enumerate(edges):
        pairs = [edge_positions(inp.regions, edge)]
        for w, window in enumerate(windows):
            want = knockout_probability(plain, inp, pairs, window, token, heads=heads, vocab_size=n_vocab)
            for name, probs in got_by.items():
                got = probs[b, w]
                diff = abs(float(got) - want) / max(abs(want), 1e-30)
                assert diff <= REL, f"{name} engine {edge} at {list(window)}: {float(got):.8g} vs oracle {want:.8g}"
                worst[name] = max(worst[name], diff)
            worst["moved"] = max(worst["moved"], abs(want - clean) / max(clean, 1e-30))
    assert worst["moved"] > 1e-3, "no knockout moved the probability: the equality would be vacuous"
    return worst


def check_oracle_suite(model: Any, plain: Any, inp: Any) -> None:
    """Every knockout check of one prompt against the oracle, each printed: the standard blocks at two windows, one
    head (``heads=[1]``), a target inside the image, and one just before it (the first marker, cut from the text
    before it: a suffix from there holds the image positions, which Gemma 3 / Qwen3-VL do not compute causally)."""
    from mm_lens.knockout import Edge

    worst = check_knockout_oracle(model, plain, inp, ["Image->Question", "Question->Last", "Image->Last",
                                                      "Image Markers->Last"], [range(0, 2), range(2, 4)])
    print(model.model_type, worst)
    single = check_knockout_oracle(model, plain, inp, ["Image->Last", "Question->Last"], [range(0, 4)], heads=[1])
    print(model.model_type, "heads=[1]", single)
    start = min(inp.regions.markers)
    before = Edge(source="Text", target="Image Markers", source_positions=tuple(range(start)),
                  target_positions=(start,))
    inside = check_knockout_oracle(model, plain, inp, ["Image Markers->Image", "Image->Last", before], [range(0, 2)])
    print(model.model_type, "inside / before the image", inside)


def check_image_positions(model: Any, inp: Any) -> None:
    """``Image`` = the positions of the image token id; ``Image Markers`` hold none of them."""
    ids = inp.input_ids[0].tolist()
    image = [p for p, i in enumerate(ids) if i == model.image_token_id]
    assert inp.regions.positions("Image") == image and image
    assert not set(inp.regions.positions("Image Markers")) & set(image)


def check_merged_grid(model: Any, inp: Any, markers: Sequence[str]) -> None:
    """The Qwen-VL packing (Qwen-VL, GLM-4V): ``Image`` is the image-token positions, one per 2x2-merged cell of
    ``image_grid_thw``, and ``Image Markers`` are exactly the begin / end `markers`."""
    check_image_positions(model, inp)
    ids = inp.input_ids[0].tolist()
    assert [ids[p] for p in inp.regions.positions("Image Markers")] == [
        model.tokenizer.convert_tokens_to_ids(t) for t in markers]
    thw = inp.extra["image_grid_thw"][0].tolist()
    assert len(inp.regions.positions("Image")) == thw[1] * thw[2] // 4


def painted_features(model: Any, image: Any, box: tuple[float, float, float, float]) -> set[int]:
    """Positions of the image features that see `box` (x, y, w, h) painted white into a black copy of `image`,
    the image sent through the family's own processor (its resampling spreads paint only to neighbouring
    pixels, so only pixels well inside the paint count)."""
    from PIL import Image, ImageDraw

    from mm_lens.inputs import prepare

    canvas = Image.new("RGB", image.size, (0, 0, 0))
    x, y, w, h = box
    ImageDraw.Draw(canvas).rectangle([x, y, x + w - 1, y + h - 1], fill=(255, 255, 255))
    inp = prepare(model, canvas, "What is this ?", protocol="checkpoint")
    outputs = {"pixel_values": inp.pixel_values, **inp.extra}
    if inp.image_sizes is not None:
        outputs["image_sizes"] = inp.image_sizes
    tiles = model.family.pixel_tiles(outputs).float().cpu()
    lo = tiles.amin(dim=(0, 2, 3), keepdim=True)
    hi = tiles.amax(dim=(0, 2, 3), keepdim=True)
    bright = ((tiles - lo) / (hi - lo).clamp_min(1e-6)).mean(1) > 0.5  # [tile, h, w]
    seen = set()
    for token in inp.regions.image_tokens:
        if token.box is None:
            continue
        x0, y0, x1, y1 = token.box
        if bright[token.tile, y0:y1, x0:x1].any():
            seen.add(token.position)
    return seen


def check_related_by_painting(model: Any, image: Any, boxes: Sequence[tuple[float, float, float, float]],
                              question: str = "What is this ?") -> None:
    """For each box: mm-lens's related patches contain the painted features, and add only features whose pixel
    rectangle touches the box's edge (where resampling decides), never one far from it."""
    from mm_lens.inputs import prepare

    for box in boxes:
        inp = prepare(model, image, question, boxes=[box], protocol="checkpoint")
        related = set(inp.regions.related)
        painted = painted_features(model, image, box)
        assert painted, f"box {box}: no feature sees the painted box"
        assert painted <= related, f"box {box}: painted {sorted(painted - related)} not related"
        extra = related - painted
        assert len(extra) <= max(2, len(related) // 2), f"box {box}: {len(extra)} related features the paint misses"


def write_dataset(folder: Path, make_image: Any, sizes: Sequence[tuple[int, int]]) -> tuple[Path, Path]:
    """A GQA-style CSV with one question per image size, and the images folder."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    path = folder / "tasks.csv"
    rows = [("Is the cube red or blue ?", "blue", "blue", "red"), ("What color is the ball ?", "red", "", "")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["question_id", "img_id", "question", "answer", "true option", "false option",
                         "width", "height"])
        for i, (w, h) in enumerate(sizes):
            question, answer, true, false = rows[i % len(rows)]
            make_image(w, h, seed=300 + i).save(images / f"img{i}.jpg")
            writer.writerow([f"q{i}", f"img{i}", question, answer, true, false, w, h])
    return path, images


def check_flow_cli(path: Path, tmp_path: Path, make_image: Any, sizes: Sequence[tuple[int, int]]) -> Any:
    """``mm-lens flow`` on the checkpoint at `path`; returns the flow table."""
    import pandas as pd

    from mm_lens.cli import main

    csv_path, images = write_dataset(tmp_path / "data", make_image, sizes)
    out = tmp_path / "flow"
    code = main(["flow", "--model", str(path), "--dataset", str(csv_path), "--images", str(images), "--out",
                 str(out), "--block", "Image->Question", "--block", "Question->Last", "--window", "2",
                 "--all-samples", "--protocol", "checkpoint"])
    assert code in (0, None)
    table = pd.read_csv(out / "flow.csv", dtype={"question_id": str})
    assert len(table) and np.isfinite(table.select_dtypes("number").to_numpy(dtype=float)).all()
    return table
