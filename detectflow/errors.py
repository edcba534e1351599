"""Errors a user can act on.

Each carries one readable line. Tasks do not retry them (retrying a wrong path or a missing
weights file cannot help) and the CLI prints them without a traceback.
"""

import errno
import functools
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


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


# What a full, read-only or forbidden output looks like from the OS (the path is the exception's).
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}


def output_errors(stage: str) -> Callable[[F], F]:
    """Decorate a stage's task: a full disk, a read-only or forbidden output becomes one
    :class:`OutputError` line naming the stage and the path (not retried: retrying cannot free
    the disk), instead of a traceback."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except OSError as exc:
                if exc.errno not in _WRITE_ERRNOS and not isinstance(exc, PermissionError):
                    raise
                path = re.sub(r"\.tmp-[0-9a-f]{32}$", "", str(exc.filename or "")) or "the output"
                why = _WRITE_ERRNOS.get(exc.errno, "access denied")
                raise OutputError(f"{stage}: cannot write {path}: {why}") from None
        return wrapper  # type: ignore[return-value]
    return decorate


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs a failed task run with its traceback; a user's mistake is its one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], DetectflowError):
            record.exc_info = record.exc_text = None
        return True


def quiet_user_errors(logger_name: str = "prefect.task_runs") -> None:
    """Install the filter on Prefect's task-run logger (once per process)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _NoTracebackForUserErrors) for f in logger.filters):
        logger.addFilter(_NoTracebackForUserErrors())
