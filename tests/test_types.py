"""The shared records: a row without image_w/image_h gives its boxes in the image's own pixels."""

import pytest

from mm_lens.types import Box, Sample, SampleSkip, boxes_for


def sample(boxes, w=None, h=None) -> Sample:
    return Sample("q1", "img", "What?", "red", None, None, w, h, tuple(boxes), "t")


def test_boxes_without_a_row_size_are_clipped_to_the_image():
    assert boxes_for(sample([Box(10, 10, 50, 50)]), 40, 30) == (Box(10, 10, 30, 20),)
    with pytest.raises(SampleSkip, match="outside the 40x30 image"):
        boxes_for(sample([Box(50, 50, 5, 5)]), 40, 30)


def test_boxes_with_a_row_size_scale_to_the_image():
    assert boxes_for(sample([Box(10, 10, 20, 20)], 100, 100), 50, 50) == (Box(5, 5, 10, 10),)
