"""Typed data-plane errors, free of any transport (after KServe's `errors.py`): each transport
maps them to its own answer in one table (`http_v2.HTTP_STATUS`; gRPC's codes likewise)."""

from __future__ import annotations


class DataPlaneError(Exception):
    """Something the data plane could not do; the message says what, for the caller."""

    # Seconds after which a retry may succeed, where that is known (a model loading, an
    # origin over its rate): REST sends it as Retry-After.
    retry_after: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(DataPlaneError):
    """The request does not fit the protocol or the model."""


class ModelNotFound(DataPlaneError):
    """No such model for this caller (another origin's model is not found either)."""


class PayloadTooLarge(DataPlaneError):
    pass


class ModelNotReady(DataPlaneError):
    """Loading, or waiting for capacity or quota: worth retrying in a second."""

    retry_after = 1.0


class WorkerUnavailable(DataPlaneError):
    """The worker went away mid-request (crashed, being replaced): retrying later may work."""

    retry_after = 1.0

    def __init__(self, message: str, accepted: bool = False) -> None:
        super().__init__(message)
        # Whether the worker had taken the request whole: one it never took may be sent to
        # another replica; one it took may be what killed it, and is not sent again.
        self.accepted = accepted


class InferenceFailed(DataPlaneError):
    """The model failed on this request."""


class Unauthorized(DataPlaneError):
    """No valid bearer token where the origin needs one."""


class TooManyRequests(DataPlaneError):
    """Over the origin's request rate or concurrency."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
