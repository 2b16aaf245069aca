"""The shapes world and the shipped toy LLaVA: schema, geometry, prompt agreement, held-out accuracy."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mm_lens.data.gqa import TASKS, load_task, open_image
from mm_lens.toy import world


@pytest.fixture(scope="session")
def toy():
    from mm_lens.demo import toy_model_path
    from mm_lens.model import load

    return load(str(toy_model_path()))


@pytest.fixture(scope="session")
def held_out(tmp_path_factory):
    """A fixed held-out set: 30 questions per task, seeded apart from training's random stream."""
    out = tmp_path_factory.mktemp("shapes")
    return out, world.write_task_csvs(out, 30, seed=777)


def test_world_is_seeded_and_written_in_the_gqa_schema(held_out, tmp_path):
    out, csvs = held_out
    assert set(csvs) == set(TASKS)
    again = world.write_task_csvs(tmp_path, 30, seed=777)
    for task in TASKS:
        assert csvs[task].read_text() == again[task].read_text()
        samples = load_task(csvs[task])
        assert len(samples) == 30
        for s in samples:
            assert s.box_problem is None or task == "LogicalObj"  # "no" answers may have no object at all
            assert s.image_w == s.image_h == world.IMAGE_SIZE
        if task.startswith("Choose"):
            assert all(s.true_option == s.answer and s.false_option not in (None, s.answer) for s in samples)


def test_boxes_cover_the_drawn_objects(held_out):
    """Each box holds its drawn object: a quarter or more of its pixels differ from the background."""
    out, csvs = held_out
    for s in load_task(csvs["ChooseRel"])[:10] + load_task(csvs["QueryAttr"])[:10]:
        img = np.asarray(open_image(out / "images", s)).astype(int)
        drawn = np.abs(img - np.array(world.BACKGROUND)).sum(-1) > 120
        assert s.boxes
        for b in s.boxes:
            inside = drawn[int(b.y): int(b.y + b.h), int(b.x): int(b.x + b.w)]
            assert inside.shape == (int(b.h), int(b.w)) and inside.mean() > 0.25, (s.question_id, b)


def test_answers_are_balanced_where_the_task_is_binary():
    rng = random.Random(5)
    for task in ("ChooseRel", "LogicalObj", "CompareAttr"):
        answers = [world.make_sample(rng, task)[1].answer for _ in range(400)]
        counts = {a: answers.count(a) for a in set(answers)}
        assert len(counts) == 2 and min(counts.values()) > 120, (task, counts)


def test_training_prompt_is_what_prepare_builds(toy):
    """The recipe trains on exactly the token sequence `prepare` gives the model at analysis time."""
    from mm_lens.inputs import prepare
    from mm_lens.toy.train import make_batch

    rng = random.Random(3)
    for task in TASKS:
        objs, q = world.make_sample(rng, task)
        batch = make_batch(toy.processor, [(objs, q)])
        inp = prepare(toy, world.jpeg_roundtrip(world.render(objs)), q.text)
        n = inp.input_ids.shape[1]
        assert batch.input_ids[0, :n].tolist() == inp.input_ids[0].tolist()
        assert int(batch.answer_pos[0]) == n - 1


def test_toy_model_answers_held_out_questions(toy, held_out):
    """At least 90% of each task type answered correctly (greedy answer, normalised as in the study)."""
    from mm_lens.inputs import prepare
    from mm_lens.sweep import greedy_answer, normalize_answer

    out, csvs = held_out
    accuracy = {}
    for task, csv in csvs.items():
        samples = load_task(csv)
        right = 0
        for s in samples:
            inp = prepare(toy, open_image(out / "images", s), s.question)
            right += greedy_answer(toy, inp).text == normalize_answer(s.answer)
        accuracy[task] = right / len(samples)
    print(accuracy)
    assert min(accuracy.values()) >= 0.9, accuracy
