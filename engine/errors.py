"""User-facing errors: each one names the bad value and the fix, in one line.

The CLI prints ``str(error)`` and exits non-zero for these; anything else is an internal bug and
keeps its traceback.
"""


class LeanLMError(Exception):
    """Base class for mistakes a user can fix (bad config, missing file, bad checkpoint)."""


class ConfigError(LeanLMError):
    """A config key, value or combination is invalid."""


class DataError(LeanLMError):
    """The data source is missing, empty or unreadable."""


class CheckpointError(LeanLMError):
    """A checkpoint is missing, corrupt or incompatible with the current config."""


class TrainingError(LeanLMError):
    """Training cannot continue (e.g. the loss became NaN/Inf)."""
