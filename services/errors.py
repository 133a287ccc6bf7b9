"""One error hierarchy for every service, each class bound to its gRPC status code.

Engines raise these; one interceptor (services/server.py) turns them into statuses. Anything else
that escapes a handler becomes INTERNAL with its traceback logged.
"""

from __future__ import annotations

import grpc


class CpumeshError(Exception):
    """Base class: an error a client should see, with its gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(CpumeshError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CpumeshError, KeyError):
    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class ResourceExhausted(CpumeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(CpumeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(CpumeshError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CpumeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(CpumeshError):
    code = grpc.StatusCode.CANCELLED


class CheckpointError(CpumeshError, ValueError):
    """A model directory or GGUF file that cannot be read: corrupt, truncated or unsupported."""

    code = grpc.StatusCode.FAILED_PRECONDITION
