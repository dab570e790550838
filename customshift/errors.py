"""The project's own error types.

Every failure caused by what a user handed us (a file, a name, a manifest row, a weights folder)
raises a subclass of :class:`CustomShiftError` with a one-line message that says what was wrong and
what to do. The CLI prints that line and exits non-zero, without a traceback.
"""

from __future__ import annotations


class CustomShiftError(Exception):
    """Base class of every user-facing error of the project."""


class ImageLoadError(CustomShiftError, ValueError):
    """An image could not be read or is not usable (missing, empty, truncated, too large, ...)."""


class IncompatibleWeightsError(CustomShiftError, ValueError):
    """Weights or a subject embedding were made for another base model or another format version."""


class ManifestError(CustomShiftError, ValueError):
    """A manifest or dataset row is malformed; the message names the file and the line."""


class PromptError(CustomShiftError, ValueError):
    """A prompt or subject name is unusable (empty, ...)."""


class WeightsError(IncompatibleWeightsError):
    """A CustomShift weights folder is unusable: its manifest, its config or its weights file is wrong."""


class WeightsNotFoundError(WeightsError):
    """No CustomShift weights where they were looked for (folder, hub repository, subfolder)."""


class SubjectEmbeddingError(IncompatibleWeightsError):
    """A subject embedding file is damaged (NaN, shapes, metadata) or does not fit the pipeline's layers."""
