"""Errors a user can act on.

Each carries one readable line. Tasks do not retry them (retrying a wrong path or a missing
weights file cannot help) and the CLI prints them without a traceback.
"""


class DetectflowError(Exception):
    """Base for errors whose message is the whole story."""


class ConfigError(DetectflowError):
    """A parameter is invalid."""


class InputError(DetectflowError):
    """The input location is missing, unreadable or holds no images."""


class WeightsError(DetectflowError):
    """Model weights are unavailable or do not fit the model."""


class ValidationFailed(DetectflowError):
    """The sampled detections break an invariant (box outside image, score out of range...)."""


class OutputError(DetectflowError):
    """The output location cannot be written."""


class RunTaken(DetectflowError):
    """Another run holds the run id (``lease``)."""


def is_retryable(exc: BaseException) -> bool:
    """Only unexpected (typically transient I/O) failures are worth a retry."""
    return not isinstance(exc, DetectflowError)
