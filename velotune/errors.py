"""Errors a user can cause and fix.

Every class here carries a message that names what was found, what was expected and what to change.
The CLI prints the message alone (no traceback) and exits with status 2.
"""


class VelotuneError(Exception):
    """Base class: a mistake in the user's input, config or environment that the user can fix."""


class ConfigError(VelotuneError):
    """An unknown or invalid configuration key or value."""


class DataError(VelotuneError):
    """A dataset that cannot be read or does not have the fields its format needs."""


class ModelLoadError(VelotuneError):
    """A checkpoint that cannot be found or read."""


class UnsupportedArchitectureError(ModelLoadError):
    """A model family velotune has no decoder table for."""


class QuantizationError(VelotuneError):
    """A quantization that cannot be applied to this model or layer."""


class ExportError(VelotuneError):
    """An export that cannot be written (format, architecture, disk space)."""


class TrainingError(VelotuneError):
    """Training cannot go on as configured (diverged, out of memory at micro-batch 1)."""


class RewardError(VelotuneError):
    """A reward function that raises, or returns something other than one number (or None) per completion."""
