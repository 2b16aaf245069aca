"""How often a model should answer a shipped task wrongly, and a warning when a run's rate is far above that.

The analyses keep correctly answered samples only (the study's filter), so a model path that is silently broken
shows up first as a wave of "wrong answers": with transformers 5.24's broken KV cache, 20 of 30 toy answers were
recorded wrong and the run went on. A run's wrong-answer rate is therefore compared with what is known:

* the model's measured accuracy on that task, where mm-lens knows it (`KNOWN_ACCURACY`: the shipped toy's, from
  its last training evaluation in ``assets/toy-llava/training_log.txt``);
* otherwise, on the two-option tasks, chance: a model that picks the wrong one of two options more often than a
  coin would is not answering the question.

The rate is "far above" when a one-sided binomial test puts it above the expected rate with p < 1e-3 and it exceeds
the expected rate by at least 20 points; small runs therefore never warn on a few unlucky samples.
"""

from __future__ import annotations

from pathlib import Path

from scipy.stats import binomtest

from mm_lens.data.gqa import TASKS

#: Measured accuracy per task of models mm-lens ships or has measured, by checkpoint folder name.
KNOWN_ACCURACY: dict[str, dict[str, float]] = {
    "toy-llava": dict.fromkeys(TASKS, 1.0),  # held-out accuracy 1.00 on every task at the saved step 3200
}
#: Tasks whose answer is one of two options (the options in the question, or yes / no).
TWO_OPTION_TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj")
P_VALUE = 1e-3
MARGIN = 0.20


def task_of(dataset: str | Path) -> str | None:
    """The shipped task a dataset is (its name, or a CSV named after it), else None."""
    name = Path(str(dataset)).name
    stem = name[:-4] if name.lower().endswith(".csv") else name
    return stem if stem in TASKS else None


def expected_wrong_rate(model: str, dataset: str | Path) -> tuple[float, str] | None:
    """The wrong-answer rate to expect and where it comes from, or None when nothing is known."""
    task = task_of(dataset)
    if task is None:
        return None
    known = KNOWN_ACCURACY.get(Path(str(model)).name, {}).get(task)
    if known is not None:
        return 1.0 - known, f"the model's measured accuracy {known:.0%} on {task}"
    if task in TWO_OPTION_TASKS:
        return 0.5, f"chance on {task}, a two-option task"
    return None


def wrong_answer_warning(model: str, dataset: str | Path, n_answered: int, n_wrong: int) -> str | None:
    """One line when `n_wrong` of `n_answered` is far above the expected wrong-answer rate, else None."""
    expected = expected_wrong_rate(model, dataset)
    if expected is None or n_answered <= 0:
        return None
    rate, source = expected
    observed = n_wrong / n_answered
    if observed - rate < MARGIN:
        return None
    p = binomtest(n_wrong, n_answered, min(max(rate, 1e-9), 1.0), alternative="greater").pvalue
    if p >= P_VALUE:
        return None
    return (f"{n_wrong} of {n_answered} answers were wrong ({observed:.0%}), far above the {rate:.0%} expected from "
            f"{source} (binomial p = {p:.1e}): the model or its set-up may be broken; check the self-check, the "
            "dtype and the protocol before reading the figures")


__all__ = ["KNOWN_ACCURACY", "TWO_OPTION_TASKS", "expected_wrong_rate", "task_of", "wrong_answer_warning"]
