"""How far the cheap patch maps agree with the knockout map on the shipped toy model's held-out questions.

For each task, `--per-task` held-out questions of the shapes world (the demo's seed): the knockout, attention and
gradient maps of single patches -> Question over the strongest window, then `map_agreement` (Spearman of each cheap
map with the knockout map, top-5 overlap). Prints one line per task and the overall mean. No threshold: this
reports what the agreement is.

    python benchmarks/maps_toy_agreement.py --per-task 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-task", type=int, default=10)
    parser.add_argument("--target", default="Question")
    args = parser.parse_args()

    from mm_lens.data.gqa import load_task, open_image
    from mm_lens.demo import HELD_OUT_SEED, toy_model_path
    from mm_lens.inputs import prepare
    from mm_lens.maps import map_agreement, patch_map
    from mm_lens.model import load
    from mm_lens.toy import world

    model = load(str(toy_model_path()))
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        csvs = world.write_task_csvs(Path(tmp), args.per_task, seed=HELD_OUT_SEED)
        for task, csv in csvs.items():
            for sample in load_task(csv):
                image = open_image(Path(tmp) / "images", sample)
                inp = prepare(model, image, sample.question)
                table = patch_map(model, inp, args.target, method=["knockout", "attention", "gradient"])
                agree = map_agreement(table, k=5).assign(task=task, question_id=sample.question_id)
                rows.append(agree)
    df = pd.concat(rows, ignore_index=True)
    summary = df.groupby(["task", "method"])[["spearman", "top_k_overlap"]].mean().unstack("method")
    print(summary.round(3).to_string())
    overall = df.groupby("method")[["spearman", "top_k_overlap"]].agg(["mean", "median"])
    print(f"\nall {len(df) // 2} maps ({time.perf_counter() - start:.0f} s):")
    print(overall.round(3).to_string())


if __name__ == "__main__":
    main()
