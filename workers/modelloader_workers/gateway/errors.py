"""Typed data-plane errors; each knows its HTTP status so transports stay thin."""

from __future__ import annotations


class DataPlaneError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str] | None:
        """HTTP headers the answer carries besides the status (Retry-After, ...)."""
        return None


class _RetrySoon(DataPlaneError):
    """Loading, or a worker being replaced: worth retrying in a second."""

    status = 503

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "1"}


class BadRequest(DataPlaneError):
    status = 400


class ModelNotFound(DataPlaneError):
    status = 404


class PayloadTooLarge(DataPlaneError):
    status = 413


class ModelNotReady(_RetrySoon):
    pass


class WorkerUnavailable(_RetrySoon):
    """The worker went away mid-request (crashed, being replaced): retrying later may work."""


class InferenceFailed(DataPlaneError):
    status = 500
