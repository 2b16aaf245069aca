"""`mm-lens patching` runs activation patching over a task set resumably, and the report draws its table (and
head-sweep / image-lens tables saved beside it)."""

from __future__ import annotations

import json

import pandas as pd

from mm_lens.cli import main
from mm_lens.heads import head_sweep
from mm_lens.image_lens import image_token_lens
from mm_lens.inputs import prepare
from mm_lens.report import report_figures
from test_runs import write_samples


def test_patching_run_resumes_and_the_report_draws_every_table(tiny_llava, tiny_llava_path, make_image, tmp_path):
    csv_path, images = write_samples(tmp_path / "data", make_image, 6)
    out = tmp_path / "out"
    argv = ["patching", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(images),
            "--out", str(out), "--region", "Image", "--region", "Question", "--limit", "4"]
    assert main(argv) == 0
    table = pd.read_csv(out / "patching.csv", dtype={"question_id": str})
    assert list(table.columns) == ["question_id", "site", "region", "layer", "prob", "clean_prob", "corrupt_prob",
                                   "restoration"]
    assert set(table["region"]) == {"Image", "Question"} and set(table["site"]) == {"resid_pre"}
    assert table.groupby(["question_id", "region"]).size().eq(tiny_llava.n_layers).all()
    config = json.loads((out / "patching.config.json").read_text())
    assert config["regions"] == ["Image", "Question"] and config["pairs"] == "image"
    before = (out / "patching.results.jsonl").read_text()
    assert main(argv) == 0  # resumes: nothing recomputed
    assert (out / "patching.results.jsonl").read_text() == before

    inp = prepare(tiny_llava, make_image(seed=1), "What color is the ball ?")
    head_sweep(tiny_llava, inp, "Image->Last", layers=[0, 1], question_id="q").to_csv(out / "heads.csv", index=False)
    image_token_lens(tiny_llava, inp, layers=[0, tiny_llava.n_layers - 1], k=3).top.to_csv(
        out / "image_lens.csv", index=False
    )
    keys = [f.key for f in report_figures(out)]
    assert {"patching", "heads", "image_lens"} <= set(keys)
