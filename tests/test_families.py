"""The family registry, and the family checks (`tests/family_checks.py`) on the study's two families."""

from __future__ import annotations

import pytest

from family_checks import check_image_positions, check_knockout_oracle, check_related_by_painting
from mm_lens.errors import MMLensError
from mm_lens.families import FAMILIES, SUPPORTED_MODEL_TYPES, families, family_of
from oracle import plain_model


def test_every_model_type_has_one_family():
    assert set(SUPPORTED_MODEL_TYPES) == set(FAMILIES) >= {"llava", "llava_next"}
    for family in families():
        assert all(family_of(t) is family for t in family.model_types)


def test_unknown_type_names_the_supported_ones():
    with pytest.raises(MMLensError, match="not supported; supported types: llava, llava_next"):
        family_of("gpt2")


@pytest.mark.parametrize("which", ["tiny_llava", "tiny_llava_next"])
def test_knockout_equals_edited_masks_in_plain_transformers(which, request, make_image):
    from mm_lens.inputs import prepare

    model = request.getfixturevalue(which)
    plain = plain_model(request.getfixturevalue(f"{which}_path"))
    inp = prepare(model, make_image(40, 32), "Is the cube red or blue ?", protocol="checkpoint",
                  spans={"True Option": "red"})
    worst = check_knockout_oracle(model, plain, inp, ["Image->Question", "Question->Last", "Image->Last",
                                                      "Image Markers->Last"], [range(0, 2), range(2, 4)])
    assert worst["moved"] > 1e-3


@pytest.mark.parametrize("which", ["tiny_llava", "tiny_llava_next"])
def test_image_positions_and_painted_boxes(which, request, make_image):
    from mm_lens.inputs import prepare

    model = request.getfixturevalue(which)
    image = make_image(48, 32)
    check_image_positions(model, prepare(model, image, "What is this ?", protocol="checkpoint"))
    check_related_by_painting(model, image, [(4, 4, 10, 8), (20, 2, 24, 28), (0, 0, 48, 6)])


def test_knockout_is_proved_live_at_load(tiny_llava):
    assert tiny_llava.self_checks["knockout_live"] > 0


def test_readme_lists_every_family():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Model families"):readme.index("## Definitions")]
    for family in families():
        for model_type in family.model_types:
            assert f"`{model_type}`" in table, f"README's family table misses {model_type}"
