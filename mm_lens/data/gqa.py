"""The six GQA task sets of the study as typed records, and safe opening of a row's image.

A row that cannot be analysed (malformed box, missing or broken image) is never a crash: the loader
records the box problem on the `Sample`, and `check_sample` / `open_image` raise `SampleSkip` with a
readable reason, so a run can skip the row, log the reason and summarise the reasons at the end.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from importlib import resources
from pathlib import Path

from mm_lens.errors import MMLensError
from mm_lens.types import (  # noqa: F401  (re-exported: these records used to live here)
    Box,
    Sample,
    SampleSkip,
    Skip,
    boxes_for,
    check_sample,
    summarise_skips,
)

TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")

REQUIRED_COLUMNS = ("question_id", "img_id", "question", "answer")
# Optional: "image_w"/"image_h" (the size the boxes are given in; read from the image when absent), options,
# object boxes and names.
# Box column groups: one object of interest ("central object") or up to two ("object1", "object2").
BOX_PREFIXES = (("central object",), ("object1", "object2"))
MISSING = "-"  # marks an absent second object in the GQA files
MAX_ASPECT_RATIO = 100  # long side / short side above which an image is skipped (see _check_image_size)


# ----------------------------------------------------------------------------------------------- loading


def task_path(name_or_path: str | Path) -> Path:
    """The CSV for a task name (case-insensitive, e.g. "ChooseAttr") or an existing CSV path."""
    text = str(name_or_path)
    by_lower = {t.lower(): t for t in TASKS}
    if text.lower() in by_lower and not Path(text).is_file():
        task = by_lower[text.lower()]
        return Path(str(resources.files("mm_lens.data").joinpath("gqa", f"{task}.csv")))
    path = Path(text).expanduser()
    if path.is_file():
        return path
    raise MMLensError(
        f"dataset {text!r} is neither a task name ({', '.join(TASKS)}) nor an existing CSV file; "
        "pass one of the task names or the path of a CSV with the GQA task columns"
    )


def load_task(name_or_path: str | Path) -> list[Sample]:
    """Every row of a task set as a `Sample`. Rows with malformed boxes are kept with ``box_problem`` set."""
    path = task_path(name_or_path)
    task = path.stem
    try:
        data = path.read_bytes()
    except OSError as err:
        raise MMLensError(f"cannot read dataset {path}: {err}") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:  # name the line, so the user can find and fix the offending row
        line = data.count(b"\n", 0, err.start) + 1
        raise MMLensError(
            f"dataset {path} is not valid UTF-8: byte 0x{data[err.start]:02x} on line {line} cannot be decoded; "
            "re-save the CSV as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    except csv.Error as err:
        raise MMLensError(f"cannot read dataset {path}: {err}; pass a UTF-8 CSV file") from err
    if not columns:
        raise MMLensError(f"dataset {path} is empty (no header row); pass a CSV with the GQA task columns")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise MMLensError(
            f"dataset {path} is missing required column {missing[0]!r}"
            + (f" (and {', '.join(map(repr, missing[1:]))})" if missing[1:] else "")
            + f"; required columns are {', '.join(REQUIRED_COLUMNS)}"
        )
    size_columns = [c for c in ("image_w", "image_h") if c in columns]
    if len(size_columns) == 1:
        gap = "image_h" if size_columns == ["image_w"] else "image_w"
        raise MMLensError(
            f"dataset {path} is missing required column {gap!r}: image_w and image_h come together (the size the "
            "boxes are given in); give both, or neither to take the size from each image"
        )
    prefixes = _box_prefixes(columns, path)
    if not rows:
        raise MMLensError(f"dataset {path} has a header but no rows; pass a CSV with at least one question")
    return [_sample(row, task, prefixes) for row in rows]


def _box_prefixes(columns: list[str], path: Path) -> tuple[str, ...]:
    """Which box column group the file uses; a group present only in part is an error naming the gap."""
    for group in BOX_PREFIXES:
        first = group[0]
        wanted = [f"{first} {k}" for k in "xywh"]
        if any(c in columns for c in wanted):
            gaps = [c for c in wanted if c not in columns]
            if gaps:
                raise MMLensError(
                    f"dataset {path} is missing required column {gaps[0]!r} (box columns are "
                    f"'{first} x', '{first} y', '{first} w', '{first} h')"
                )
            present = [p for p in group if all(f"{p} {k}" in columns for k in "xywh")]
            return tuple(present)
    return ()  # a user's CSV without boxes: patch-level regions are then unavailable for its rows


def _sample(row: dict[str, str], task: str, prefixes: tuple[str, ...]) -> Sample:
    qid = _cell(row, "question_id")
    problem = None
    width = height = None
    if "image_w" in row or "image_h" in row:  # the size the boxes are given in; else the image's own
        width, height = _positive_int(_cell(row, "image_w")), _positive_int(_cell(row, "image_h"))
        if width is None or height is None:
            problem = f"image size {_cell(row, 'image_w')!r} x {_cell(row, 'image_h')!r} is not two positive integers"
            width, height = width or 0, height or 0
    boxes: list[Box] = []
    for prefix in prefixes:
        if problem:
            break
        box, problem = _box(row, prefix)
        if box is None:
            continue
        clipped = box if width is None else box.clip(width, height)  # unknown size: clipped once the image is open
        if clipped is None:
            problem = f"{prefix} box {_box_text(box)} lies outside the {width}x{height} image"
        else:
            boxes.append(clipped)
    if prefixes and not boxes and problem is None:
        problem = f"no box given ({prefixes[0]} x/y/w/h are '-')"
    return Sample(
        question_id=qid,
        img_id=_cell(row, "img_id"),
        question=_cell(row, "question"),
        answer=_cell(row, "answer"),
        true_option=_cell(row, "true option") or None,
        false_option=_cell(row, "false option") or None,
        image_w=width,
        image_h=height,
        boxes=tuple(boxes) if problem is None else (),
        task=task,
        box_problem=problem,
        central_object=_cell(row, "central object name") or None,
    )


def _box(row: dict[str, str], prefix: str) -> tuple[Box | None, str | None]:
    """Parse one object's box: (box, None); (None, None) for an absent object ('-'); (None, reason)."""
    cells = {k: _cell(row, f"{prefix} {k}") for k in "xywh"}
    if all(v in (MISSING, "") for v in cells.values()):
        return None, None  # the caller reports "no box" when no object of the row has one
    values = {}
    for k, text in cells.items():
        try:
            value = float(text)
        except ValueError:
            return None, f"{prefix} box has non-numeric {k} {text!r}"
        if not math.isfinite(value):
            return None, f"{prefix} box has non-finite {k} {text!r}"
        values[k] = value
    if values["w"] <= 0 or values["h"] <= 0:
        return None, f"{prefix} box has non-positive size w={cells['w']} h={cells['h']}"
    name = _cell(row, f"{prefix} name")
    return Box(values["x"], values["y"], values["w"], values["h"], "" if name == MISSING else name), None


def _cell(row: dict[str, str], column: str) -> str:
    value = row.get(column)
    return "" if value is None else value.strip()


def _positive_int(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or value <= 0 or value != int(value):
        return None
    return int(value)


def _box_text(box: Box) -> str:
    return f"(x={box.x:g}, y={box.y:g}, w={box.w:g}, h={box.h:g})"


# ------------------------------------------------------------------------------------------ per-sample use


def image_path(images_dir: str | Path, sample: Sample) -> Path:
    """``<images_dir>/<img_id>.jpg``, or another common extension when that is what exists."""
    folder = Path(images_dir).expanduser()
    default = folder / f"{sample.img_id}.jpg"
    if default.exists():
        return default
    for ext in (".jpeg", ".png", ".JPG", ".JPEG", ".PNG"):
        candidate = folder / f"{sample.img_id}{ext}"
        if candidate.exists():
            return candidate
    return default


def open_image(images_dir: str | Path, sample: Sample):
    """The row's image as RGB, fully decoded; `SampleSkip` if it is missing, unreadable or truncated."""
    from PIL import Image, UnidentifiedImageError

    path = image_path(images_dir, sample)
    qid = sample.question_id
    if not path.is_file():
        raise SampleSkip(f"image {path} not found (img_id {sample.img_id})", "image not found", qid)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # _check_image_size says it better
            with Image.open(path) as img:
                _check_image_size(path, *img.size, qid)  # from the header, before decoding a huge file
                img.load()  # decode now, so a truncated file fails here and not inside the model
                return img.convert("RGB")
    except UnidentifiedImageError:
        raise SampleSkip(f"image {path} is not a readable image file", "image unreadable", qid) from None
    except Image.DecompressionBombError as err:
        raise SampleSkip(f"image {path} is too large to open safely ({err})", "image too large", qid) from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL reports truncation and corrupt data as OSError
        raise SampleSkip(f"image {path} is unreadable or truncated ({err})", "image unreadable", qid) from None


def _check_image_size(path: Path, width: int, height: int, qid: str) -> None:
    """`SampleSkip` for an image whose decoding or resizing would need gigabytes.

    The pixel limit is PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, ~89 MP; None turns it
    off); a side ratio above `MAX_ASPECT_RATIO` is refused too, because the processors resize the *short* side
    up to the model's resolution (a 1 x 10000 px strip would become 336 x 3 360 000 px).
    """
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise SampleSkip(
            f"image {path} is {width}x{height} px ({width * height / 1e6:.0f} MP), above PIL's decompression-bomb "
            f"limit of {limit / 1e6:.0f} MP; downscale it (or raise PIL.Image.MAX_IMAGE_PIXELS)",
            "image too large",
            qid,
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise SampleSkip(
            f"image {path} is {width}x{height} px, a side ratio above {MAX_ASPECT_RATIO}:1 that the image "
            "processor would blow up to a huge resized copy; crop it to the region of interest",
            "image aspect ratio too extreme",
            qid,
        )
