"""The records every analysis shares: an object's `Box`, a question's `Sample`, and why a sample was skipped.

A sample that cannot be analysed raises `SampleSkip` (an `MMLensError` with a short ``kind``); runs record it
as a `Skip` and `summarise_skips` counts the kinds at the end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from mm_lens.errors import MMLensError

#: The skip kind of a sample the model answers wrongly (the study keeps correct answers only).
WRONG_ANSWER = "wrong answer"  # skip kind of a sample the model answers wrongly


@dataclass(frozen=True)
class Box:
    """An object's box in pixels of the original image; (x, y) is the top-left corner."""

    x: float
    y: float
    w: float
    h: float
    name: str = ""

    @property
    def x1(self) -> float:
        return self.x + self.w

    @property
    def y1(self) -> float:
        return self.y + self.h

    def clip(self, width: float, height: float) -> Box | None:
        """This box cut to the image ``width`` x ``height``; None when nothing of it is inside."""
        x0, y0 = max(self.x, 0.0), max(self.y, 0.0)
        x1, y1 = min(self.x1, float(width)), min(self.y1, float(height))
        if x1 <= x0 or y1 <= y0:
            return None
        return Box(x0, y0, x1 - x0, y1 - y0, self.name)

    def scaled(self, sx: float, sy: float) -> Box:
        return Box(self.x * sx, self.y * sy, self.w * sx, self.h * sy, self.name)


@dataclass(frozen=True)
class Sample:
    """One question of a task set. ``box_problem`` says why the boxes are unusable (None when fine)."""

    question_id: str
    img_id: str
    question: str
    answer: str
    true_option: str | None
    false_option: str | None
    image_w: int | None  # the size the boxes are given in; None: the image's own size
    image_h: int | None
    boxes: tuple[Box, ...]
    task: str
    box_problem: str | None = None
    central_object: str | None = None  # the object the question is about (column "central object name")

    @property
    def options(self) -> tuple[str, ...]:
        """The answer options offered by the question (Choose* sets), else ()."""
        return tuple(o for o in (self.true_option, self.false_option) if o)


class SampleSkip(MMLensError):
    """This one sample cannot be analysed; the run skips it and records ``reason``.

    ``kind`` is a short category without per-row details ("image not found", "malformed box", ...), so a
    run can count the reasons in its final summary.
    """

    def __init__(self, reason: str, kind: str, question_id: str | None = None):
        super().__init__(f"question {question_id}: {reason}" if question_id else reason)
        self.question_id = question_id
        self.reason = reason
        self.kind = kind

    def record(self, question_id: str | None = None) -> Skip:
        """The skip as a run records it; ``question_id`` fills in an id the raiser did not know."""
        return Skip(question_id or self.question_id or "", self.reason, self.kind)


@dataclass(frozen=True)
class Skip:
    """A skipped sample and why, as a run records it."""

    question_id: str
    reason: str
    kind: str


def check_sample(sample: Sample, need_boxes: bool = True) -> None:
    """Raise `SampleSkip` when ``need_boxes`` and the row's boxes are malformed or absent."""
    if not need_boxes:
        return
    if sample.box_problem:
        kind = "no box" if sample.box_problem.startswith("no box") else "malformed box"
        raise SampleSkip(sample.box_problem, kind, sample.question_id)
    if not sample.boxes:
        raise SampleSkip("the row gives no object box", "no box", sample.question_id)


def boxes_for(sample: Sample, width: int, height: int) -> tuple[Box, ...]:
    """The sample's boxes in the pixels of an image of ``width`` x ``height``.

    GQA boxes are in the row's ``image_w`` x ``image_h``; a user's resized copy of the image gets the boxes
    scaled to match, so related patches stay on the object. A row without a size gives its boxes in the
    image's pixels: they are clipped to it here (`SampleSkip` when one lies outside).
    """
    if sample.image_w is None or sample.image_h is None:
        clipped = tuple(b.clip(width, height) for b in sample.boxes)
        if any(c is None for c in clipped):
            raise SampleSkip(
                f"a box of the row lies outside the {width}x{height} image", "malformed box", sample.question_id
            )
        return clipped  # type: ignore[return-value]
    if (width, height) == (sample.image_w, sample.image_h) or not sample.image_w or not sample.image_h:
        return sample.boxes
    sx, sy = width / sample.image_w, height / sample.image_h
    return tuple(b.scaled(sx, sy) for b in sample.boxes)


def summarise_skips(skips: Iterable[Skip | SampleSkip]) -> str:
    """One line per kind of reason with its count, most frequent first."""
    kinds = Counter(s.kind for s in skips)
    if not kinds:
        return "no samples skipped"
    lines = [f"{sum(kinds.values())} sample(s) skipped:"]
    lines += [f"  {n:>6}  {kind}" for kind, n in kinds.most_common()]
    return "\n".join(lines)
