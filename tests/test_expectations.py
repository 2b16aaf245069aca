"""mm_lens.expectations: a wrong-answer rate far above the model's known one is flagged, small noise is not."""

from __future__ import annotations

from mm_lens.demo import toy_model_path
from mm_lens.expectations import expected_wrong_rate, task_of, wrong_answer_warning
from mm_lens.run_dir import RunSummary
from mm_lens.types import WRONG_ANSWER, Skip


def test_the_toy_is_expected_to_answer_every_shipped_task():
    assert expected_wrong_rate(str(toy_model_path()), "ChooseAttr")[0] == 0.0
    assert task_of("/runs/data/QueryAttr.csv") == "QueryAttr" and task_of("mine.csv") is None


def test_the_broken_cache_case_is_flagged():
    """transformers 5.24's broken cache: 20 of 30 toy answers recorded wrong."""
    warning = wrong_answer_warning(str(toy_model_path()), "ChooseAttr", 30, 20)
    assert warning is not None and "20 of 30" in warning and "measured accuracy 100%" in warning


def test_a_few_wrong_answers_and_unknown_models_are_not_flagged():
    assert wrong_answer_warning(str(toy_model_path()), "ChooseAttr", 30, 2) is None
    assert wrong_answer_warning("llava-hf/llava-1.5-7b-hf", "QueryAttr", 100, 90) is None  # open task, unknown
    assert wrong_answer_warning("some/model", "my-own.csv", 100, 100) is None


def test_worse_than_chance_on_a_two_option_task_is_flagged_for_any_model():
    assert wrong_answer_warning("llava-hf/llava-1.5-7b-hf", "LogicalObj", 200, 160) is not None
    assert wrong_answer_warning("llava-hf/llava-1.5-7b-hf", "LogicalObj", 200, 110) is None  # within chance


def test_the_run_summary_prints_its_warnings(tmp_path):
    skips = [Skip(f"q{i}", "model answered 'no', gold 'yes'", WRONG_ANSWER) for i in range(3)]
    summary = RunSummary("flow", tmp_path, n_samples=5, n_analysed=2, n_resumed=0, skips=skips,
                         warnings=["3 of 5 answers were wrong"])
    assert summary.n_wrong == 3
    assert "warning: 3 of 5 answers were wrong" in summary.text()


def test_a_flow_run_with_mostly_wrong_answers_says_so(tmp_path):
    import pandas as pd

    from mm_lens.runs import flow_run
    from mm_lens.toy import world

    csvs = world.write_task_csvs(tmp_path / "data", 8, seed=77)
    csv = csvs["ChooseAttr"]
    table = pd.read_csv(csv)
    table["answer"] = "no such answer"  # the toy answers well; every gold answer is now wrong
    table.to_csv(csv, index=False)
    summary = flow_run(tmp_path / "run", str(toy_model_path()), csv, tmp_path / "data" / "images",
                       blocks=["Image->Last"], window=2, progress=False)
    assert summary.n_analysed == 0 and summary.n_wrong == 8
    assert summary.warnings and "8 of 8 answers were wrong" in summary.warnings[0]
    assert "warning: 8 of 8" in summary.text()
