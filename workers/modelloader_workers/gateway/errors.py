"""Typed data-plane errors; each knows its HTTP status so transports stay thin."""

from __future__ import annotations


class DataPlaneError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(DataPlaneError):
    status = 400


class ModelNotFound(DataPlaneError):
    status = 404


class PayloadTooLarge(DataPlaneError):
    status = 413


class ModelNotReady(DataPlaneError):
    status = 503


class WorkerUnavailable(DataPlaneError):
    """The worker went away mid-request (crashed, being replaced): retrying later may work."""

    status = 503


class InferenceFailed(DataPlaneError):
    status = 500
