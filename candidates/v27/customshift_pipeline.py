"""Lets DiffusionPipeline.from_pretrained find CustomShiftPipeline (the custom_pipeline route)."""
from customshift.pipeline import CustomShiftPipeline  # noqa: F401
