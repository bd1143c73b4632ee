"""What the repository builder, the Triton models and clients agree on: parameter keys and how a request is refused.

Imported by serving/server/repository.py as a module of the package and by the copied model.py files as their
sibling ``protocol``; so standard library only, and triton_python_backend_utils only inside functions (the builder
runs where Triton is not).
"""
import os

CARD = "trident_card"               # the model card as JSON (serving/card.py: ModelCard.to_json)
RUNTIME = "trident_runtime"         # how the model runs its graph: GraphRuntime.to_json (serving/graph_runtime.py)
MAX_IMAGES = "trident_max_images"    # loop model: images per request (clients read it)
ORT_BACKEND_THREADS = "intra_op_thread_count"  # the native onnxruntime backend's own parameter (container flavour)

# Shutdown: Triton does not tell a running execute() that the server is stopping, so a sampling loop in flight would
# hold the exit for its whole length. The launcher (serving/server/launcher.py) names a file in this environment
# variable, which the server and its Python-backend stubs inherit, and creates it just before it asks Triton to stop;
# the loop models look for it before every step and answer SHUTTING_DOWN (the client's ServerUnreachableError).
STOP_FILE_ENV = "TRIDENT_STOP_FILE"
SHUTTING_DOWN = "the server is shutting down"
# a loop that ran past the max_seconds its client sent (the client's own timeout): the client reports it as its timeout,
# whichever of the two arrives first
OUT_OF_TIME = "the loop ran longer than max_seconds"


def shutting_down() -> bool:
    """Whether the launcher has asked this server to stop (one stat call: cheap enough for every sampling step)."""
    path = os.environ.get(STOP_FILE_ENV)
    return bool(path) and os.path.exists(path)


class InvalidRequest(ValueError):
    """A request a model cannot serve; its message goes back to the client as an INVALID_ARG error."""


def parameters(model_config: dict) -> dict:
    """The `parameters` of a model configuration (as Triton hands it to initialize) as {key: string}."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def error_response(message: str, invalid_argument: bool = True, code_name: str | None = None):
    """An InferenceResponse that carries only an error: INVALID_ARG (or the TritonError code `code_name`, e.g.
    "UNAVAILABLE") where this Triton has that code, else the default (INTERNAL)."""
    import triton_python_backend_utils as pb_utils

    code_name = code_name or ("INVALID_ARG" if invalid_argument else None)
    code = getattr(pb_utils.TritonError, code_name, None) if code_name else None
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
