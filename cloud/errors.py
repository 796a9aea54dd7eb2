"""Domain errors raised by cloud handlers; the servicer maps each to a gRPC status code."""

from __future__ import annotations


class CloudError(Exception):
    """Base class: ``str(err)`` is a message a person can act on."""


class NotFound(CloudError):
    """The named session, bundle or adapter does not exist for this identity."""


class PermissionDenied(CloudError):
    """The caller is authenticated but may not do this."""


class Unauthenticated(CloudError):
    """The caller presented no verified client certificate."""


class InvalidArgument(CloudError):
    """A request that can never succeed as sent (bad shape, dtype, phase, file name...)."""


class FailedPrecondition(CloudError):
    """A request out of order for the session's state (e.g. backward before forward)."""


class ResourceExhausted(CloudError):
    """A per-client limit was reached (concurrent streams, message size)."""


class DeadlineExceeded(CloudError):
    """The client went silent for longer than the idle timeout."""


class DataLoss(CloudError):
    """A stored artifact is corrupted and was not used."""


class Unavailable(CloudError):
    """The middle's compute is gone for now (a Ray worker died mid-step); retrying the step succeeds."""
