"""Datasets: the study's six GQA task sets (shipped CSVs) as typed records with object boxes."""

from mm_lens.data.gqa import TASKS, load_task, open_image
from mm_lens.types import Box, Sample, SampleSkip, Skip

__all__ = ["TASKS", "Box", "Sample", "SampleSkip", "Skip", "load_task", "open_image"]
