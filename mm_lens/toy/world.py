"""The shapes world: seeded scenes of a few coloured shapes with exact boxes, and GQA-style questions.

Every question type mirrors one of the study's six GQA task sets, and `write_task_csvs` writes them in the
GQA task-set CSV schema (same column names, boxes in pixels), so one loader serves both.
"""

from __future__ import annotations

import csv
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
COLORS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 230),
    "green": (40, 170, 60),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
}
SIZES = {"small": 14, "large": 30}
# Objects sit on a 4 x 4 grid of 16 px cells (the toy model's patches): a small one fills a cell, a large one
# a 2 x 2 block, each with a 1 px margin, so every patch shows one clean piece of at most one shape.
CELL = 16
CELLS = IMAGE_SIZE // CELL
BACKGROUND = (200, 200, 200)
TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")
# Left/right answers need a clear margin so the question has one right answer.
_LR_MARGIN = 8
_HALF = IMAGE_SIZE / 2


@dataclass(frozen=True)
class Obj:
    """One shape in a scene; (x, y, w, h) is its bounding box in pixels, x/y the top-left corner."""

    shape: str
    color: str
    size: str
    x: int
    y: int

    @property
    def w(self) -> int:
        return SIZES[self.size]

    @property
    def h(self) -> int:
        return SIZES[self.size]

    @property
    def cx(self) -> float:
        return self.x + self.w / 2


@dataclass(frozen=True)
class Question:
    """A question about a scene, with its answer, options and objects of interest (`objects[i]` may be None)."""

    task: str
    text: str
    answer: str
    true_option: str | None
    false_option: str | None
    objects: tuple[Obj | None, ...]


def _place(rng: random.Random, shapes: list[str]) -> list[Obj]:
    """Place distinct shapes on free grid cells, with random colour and size."""
    for _ in range(200):
        taken: set[tuple[int, int]] = set()
        objs: list[Obj] = []
        for shape in shapes:
            size = rng.choice(list(SIZES))
            span = 2 if size == "large" else 1
            free = [(r, c) for r in range(CELLS - span + 1) for c in range(CELLS - span + 1)
                    if not any((r + i, c + j) in taken for i in range(span) for j in range(span))]
            if not free:
                break
            r, c = rng.choice(free)
            taken |= {(r + i, c + j) for i in range(span) for j in range(span)}
            objs.append(Obj(shape, rng.choice(list(COLORS)), size, c * CELL + 1, r * CELL + 1))
        if len(objs) == len(shapes):
            return objs
    raise RuntimeError("could not place shapes")  # pragma: no cover - a 4 x 4 grid always fits three


def render(objs: list[Obj] | tuple[Obj, ...]) -> Image.Image:
    """Draw a scene as an RGB image."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in objs:
        box = [o.x, o.y, o.x + o.w - 1, o.y + o.h - 1]
        fill = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse(box, fill=fill)
        elif o.shape == "square":
            d.rectangle(box, fill=fill)
        elif o.shape == "triangle":
            d.polygon([(o.x, o.y + o.h - 1), (o.x + o.w - 1, o.y + o.h - 1), (o.x + (o.w - 1) / 2, o.y)], fill=fill)
        else:  # five-pointed star
            cx, cy, r_out, r_in = o.x + (o.w - 1) / 2, o.y + (o.h - 1) / 2, (o.w - 1) / 2, (o.w - 1) / 4.6
            pts = []
            for i in range(10):
                r = r_out if i % 2 == 0 else r_in
                a = -math.pi / 2 + i * math.pi / 5
                pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
            d.polygon(pts, fill=fill)
    return img


def _side(o: Obj) -> str | None:
    if o.cx <= _HALF - _LR_MARGIN / 2:
        return "left"
    if o.cx >= _HALF + _LR_MARGIN / 2:
        return "right"
    return None


def _choose_attr(rng: random.Random) -> tuple[list[Obj], Question]:
    objs = _place(rng, rng.sample(SHAPES, rng.randint(2, 3)))
    o = rng.choice(objs)
    if rng.random() < 0.7:
        true, false = o.color, rng.choice([c for c in COLORS if c != o.color])
    else:
        true, false = o.size, ("large" if o.size == "small" else "small")
    a, b = rng.sample([true, false], 2)
    return objs, Question("ChooseAttr", f"Is the {o.shape} {a} or {b}?", true, true, false, (o,))


def _choose_cat(rng: random.Random) -> tuple[list[Obj], Question]:
    while True:
        objs = _place(rng, rng.sample(SHAPES, rng.randint(2, 3)))
        o = rng.choice(objs)
        if sum(p.color == o.color for p in objs) == 1:
            break
    false = rng.choice([s for s in SHAPES if s != o.shape])
    a, b = rng.sample([o.shape, false], 2)
    q = Question("ChooseCat", f"Which shape is {o.color}, the {a} or the {b}?", o.shape, o.shape, false, (o,))
    return objs, q


def _choose_rel(rng: random.Random) -> tuple[list[Obj], Question]:
    while True:
        objs = _place(rng, rng.sample(SHAPES, rng.randint(2, 3)))
        o1, o2 = rng.sample(objs, 2)
        if abs(o1.cx - o2.cx) >= _LR_MARGIN:
            break
    ans = "left" if o1.cx < o2.cx else "right"
    false = "right" if ans == "left" else "left"
    text = f"Is the {o1.shape} to the left or to the right of the {o2.shape}?"
    return objs, Question("ChooseRel", text, ans, ans, false, (o1, o2))


def _compare_attr(rng: random.Random) -> tuple[list[Obj], Question]:
    while True:
        objs = _place(rng, rng.sample(SHAPES, rng.randint(2, 3)))
        o1, o2 = rng.sample(objs, 2)
        same_color, same_size = o1.color == o2.color, o1.size == o2.size
        if same_color != same_size:
            break
        # Re-draw one attribute of o2 so that exactly one is shared, keeping placement.
        if rng.random() < 0.5:
            color = o1.color if not same_color else rng.choice([c for c in COLORS if c != o1.color])
            new = Obj(o2.shape, color, o2.size, o2.x, o2.y)
            objs = [new if p is o2 else p for p in objs]
            o2 = new
            if (o1.color == o2.color) != (o1.size == o2.size):
                break
    ans = "color" if o1.color == o2.color else "size"
    text = f"What do the {o1.shape} and the {o2.shape} have in common?"
    return objs, Question("CompareAttr", text, ans, None, None, (o1, o2))


def _logical_obj(rng: random.Random) -> tuple[list[Obj], Question]:
    s1, s2 = rng.sample(SHAPES, 2)
    kind = rng.choice(["either", "both"])
    want_yes = rng.random() < 0.5
    others = [s for s in SHAPES if s not in (s1, s2)]
    if kind == "either":
        present = rng.choice([[s1], [s2], [s1, s2]]) if want_yes else []
    else:
        present = [s1, s2] if want_yes else rng.choice([[s1], [s2], []])
    fill = rng.sample(others, rng.randint(max(0, 2 - len(present)), len(others)))
    objs = _place(rng, present + fill)
    by_shape = {o.shape: o for o in objs}
    yes = (s1 in by_shape or s2 in by_shape) if kind == "either" else (s1 in by_shape and s2 in by_shape)
    text = f"Are there {kind} {PLURALS[s1]} or {PLURALS[s2]}?" if kind == "either" else \
        f"Are there both {PLURALS[s1]} and {PLURALS[s2]}?"
    ans = "yes" if yes else "no"
    return objs, Question("LogicalObj", text, ans, None, None, (by_shape.get(s1), by_shape.get(s2)))


def _query_attr(rng: random.Random) -> tuple[list[Obj], Question]:
    while True:
        objs = _place(rng, rng.sample(SHAPES, rng.randint(2, 3)))
        o = rng.choice(objs)
        if rng.random() < 0.5:
            return objs, Question("QueryAttr", f"What color is the {o.shape}?", o.color, None, None, (o,))
        side = _side(o)
        if side is not None:
            return objs, Question("QueryAttr", f"In which part of the image is the {o.shape}?", side, None, None, (o,))


_MAKERS = {
    "ChooseAttr": _choose_attr,
    "ChooseCat": _choose_cat,
    "ChooseRel": _choose_rel,
    "CompareAttr": _compare_attr,
    "LogicalObj": _logical_obj,
    "QueryAttr": _query_attr,
}


def make_sample(rng: random.Random, task: str | None = None) -> tuple[list[Obj], Question]:
    """One scene and one question about it; `task` picks the type (random when None)."""
    return _MAKERS[task or rng.choice(TASKS)](rng)


def vocabulary() -> list[str]:
    """Every word the world's prompts and answers use (answers also capitalised, as LLaVA answers)."""
    words = {"Is", "the", "or", "Which", "shape", "is", "to", "left", "right", "of", "What", "do", "and",
             "have", "in", "common", "Are", "there", "either", "both", "color", "In", "which", "part", "image",
             "Answer", "question", "using", "a", "single", "word", "phrase", "yes", "no", "size", "USER",
             "ASSISTANT"}
    words |= set(SHAPES) | set(PLURALS.values()) | set(COLORS) | set(SIZES)
    words |= {
        w.capitalize() for w in set(SHAPES) | set(COLORS) | set(SIZES) | {"left", "right", "yes", "no", "color", "size"}
    }
    return sorted(words)


def jpeg_roundtrip(img: Image.Image, quality: int = 95) -> Image.Image:
    """The image as it reads back from the JPEG file the CSV points to."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


_BOX_COLS = ("x", "y", "w", "h")


def _csv_row(qid: str, img_id: str, q: Question) -> dict[str, str]:
    row = {"question_id": qid, "img_id": img_id, "question": q.text, "answer": q.answer,
           "image_w": str(IMAGE_SIZE), "image_h": str(IMAGE_SIZE), "task": q.task}
    if q.task in ("ChooseAttr", "ChooseCat", "QueryAttr"):
        o = q.objects[0]
        row["central object name"] = o.shape
        for c in _BOX_COLS:
            row[f"central object {c}"] = str(getattr(o, c))
    else:  # as in GQA, a missing object ('-') is always the second one
        for i, o in enumerate(sorted(q.objects, key=lambda o: o is None), start=1):
            row[f"object{i} name"] = o.shape if o else "-"
            for c in _BOX_COLS:
                row[f"object{i} {c}"] = str(getattr(o, c)) if o else "-"
    if q.true_option is not None:
        row["true option"], row["false option"] = q.true_option, q.false_option
    return row


def write_task_csvs(out_dir: str | Path, n_per_task: int, seed: int = 1234) -> dict[str, Path]:
    """Write `n_per_task` seeded samples of each task: `<Task>.csv` in the GQA schema and `images/<img_id>.jpg`."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    for t_i, task in enumerate(TASKS):
        rng = random.Random(seed * 1000 + t_i)
        rows = []
        for i in range(n_per_task):
            objs, q = make_sample(rng, task)
            img_id = f"{task.lower()}{i:05d}"
            render(objs).save(out / "images" / f"{img_id}.jpg", quality=95)
            rows.append(_csv_row(f"{task.lower()}-{i:05d}", img_id, q))
        cols: list[str] = []
        for r in rows:
            cols += [c for c in r if c not in cols]
        path = out / f"{task}.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="-")
            w.writeheader()
            w.writerows(rows)
        paths[task] = path
    return paths
