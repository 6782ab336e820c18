"""The one exception hierarchy of the project.

    EdgeError                      base; carries an exit code for the CLI
     ├── UsageError                bad arguments or options (exit 2)
     ├── ProfileError              a device profile is unknown, malformed or incomplete
     ├── DataError                 calibration / request data does not fit the model
     ├── ModelError                a model file cannot be read, checked or run
     ├── CompressionError          the compressor cannot produce an artifact
     │    └── BudgetError          no candidate meets the profile's budgets
     ├── BundleError               a bundle is malformed, incomplete or tampered with
     │    └── SignatureError       missing, wrong-key or invalid signature
     ├── RequestError              an inference request is malformed (HTTP 400 / MQTT error reply)
     │    └── PayloadTooLarge      the request is over the size limit (413)
     ├── NotFoundError             no such model or version (404)
     ├── InternalError             a bug or an engine failure while answering a request (500)
 ├── UpdateError               a device failed or rolled back a model update
     └── TransientError            the operation may succeed if retried (broker down, ...)
          └── UnavailableError     the model exists but cannot serve right now (503)

Third-party exceptions are translated at one boundary per dependency (``raise ... from exc``);
the CLI turns an ``EdgeError`` into one readable line and ``exit_code``.
"""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "BundleError",
    "CompressionError",
    "DataError",
    "EdgeError",
    "InternalError",
    "ModelError",
    "NotFoundError",
    "PayloadTooLarge",
    "ProfileError",
    "RequestError",
    "SignatureError",
    "TransientError",
    "UnavailableError",
    "UpdateError",
    "UsageError",
]


class EdgeError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code: int = 1
    retryable: bool = False
    status: int = 500
    """HTTP status a server answers this error with."""


class UsageError(EdgeError):
    """The caller asked for something that cannot be done as asked."""

    exit_code = 2


class ProfileError(EdgeError):
    """A device profile is unknown, malformed or incomplete."""


class DataError(EdgeError):
    """Input data (calibration set, request tensors) does not fit the model."""


class ModelError(EdgeError):
    """A model file cannot be read, checked or run."""


class CompressionError(EdgeError):
    """The compressor cannot produce an artifact for this model and profile."""


class BudgetError(CompressionError):
    """No compressed candidate meets the device profile's budgets."""

    exit_code = 3


class BundleError(EdgeError):
    """A bundle is malformed, incomplete, or a member does not match its manifest."""


class SignatureError(BundleError):
    """A bundle is unsigned, signed by another key, or its signature is invalid."""


class TransientError(EdgeError):
    """A failure that may go away on retry (the broker is down, a file is busy)."""

    retryable = True


class RequestError(EdgeError):
    """An inference request is malformed: bad JSON, wrong tensor name, shape or dtype."""

    status = 400


class PayloadTooLarge(RequestError):
    """An inference request is larger than the configured limit."""

    status = 413


class NotFoundError(EdgeError):
    """No such model, or no such version of it."""

    status = 404


class UnavailableError(TransientError):
    """The model exists but cannot serve right now (loading, failed self-test)."""

    status = 503


class InternalError(EdgeError):
    """A bug or an engine failure while answering a request; the server answers 500 and keeps serving."""

    status = 500


class UpdateError(EdgeError):
    """A device refused, failed or rolled back a model update (the running version is untouched)."""
