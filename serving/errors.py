"""Every error trident raises derives from TridentError, so a caller can catch the package's failures in one clause.

The SDK's errors live here (they cross the client, the backends and the CLI); the others live with the code that
raises them and subclass TridentError: ExportError (export/), RepositoryError and TritonServerError (serving/server/),
CheckpointError and DatasetError (training/).

Two exceptions to the rule, both deliberate: the modules copied into Triton model folders (sampling.py, card.py,
ort_runner.py; see serving/server/runtime) cannot import this module, so they raise plain ValueError for a bad value,
which every caller in the package turns into one of the errors below; and sampling.SamplingCancelled is a control
signal (a callback asked to stop), not a failure.
"""
from __future__ import annotations


class TridentError(RuntimeError):
    """Base class of every error the package raises."""


class InvalidArgumentError(TridentError, ValueError):
    """An argument is out of range; raised before any request is sent."""


class ServerUnreachableError(TridentError):
    """No Triton server answers at this address (never started, killed, or shutting down)."""

    def __init__(self, url: str, detail: str = ""):
        super().__init__(f"cannot reach a Triton server at {url}{': ' + detail if detail else ''}. "
                         f"Is it running? Start one with `trident serve` (or `trident demo`), or pass --url.")
        self.url = url


class ModelNotReadyError(TridentError):
    """The backend does not have this model, or the server has it but not ready."""


class InferenceError(TridentError):
    """The server answered a request with an error."""


class ExportMetadataError(TridentError):
    """An export folder is missing or malformed."""
