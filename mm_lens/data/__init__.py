"""Datasets: the study's six GQA task sets (shipped CSVs) as typed records with object boxes."""

from mm_lens.data.gqa import TASKS, Box, Sample, SampleSkip, Skip, load_task, open_image

__all__ = ["TASKS", "Box", "Sample", "SampleSkip", "Skip", "load_task", "open_image"]
