"""What the repository builder and the Triton models agree on: parameter keys and how a request is refused.

Imported by serving/server/repository.py as a module of the package and by the copied model.py files as their
sibling ``protocol``; so standard library only, and triton_python_backend_utils only inside functions (the builder
runs where Triton is not).
"""
import json
import os

CARD = "trident_card"               # the model card as JSON (serving/card.py: ModelCard.to_json)
FILES = "trident_onnx_files"         # JSON {bucket: file name in the version directory}
ENGINES = "trident_engines"          # JSON {bucket: ort_runner engine}: onnxruntime, openvino-f32 or openvino-bf16
PRECISION = "trident_precision"      # JSON {bucket: variant} (serving/precision.py): what the build chose
RANGES = "trident_input_ranges"      # JSON {input name: {"low", "high", "hint"}}, valid is low <= x < high
BUCKET_MODELS = "trident_bucket_models"  # container flavour: JSON {bucket: per-bucket model name} a front model calls
UNET_IO = "trident_unet_io"          # loop model: JSON [sample, timestep, class_label, noise_pred] U-Net tensor names
MAX_IMAGES = "trident_max_images"    # loop model: images per request
THREADS = "intra_op_num_threads"     # ONNX Runtime threads of a whole call (0: its default)
SHARDS = "row_shards"                # concurrent row shards on the CPU (0: one per core, 1: off)
SHARD_LIMIT = "trident_shard_limit"  # the largest bucket a row shard runs (0: the largest), or "measured": the build
                                     # measured it on its machine (serving/precision.py) and wrote it, with the
                                     # trial's numbers, into MEASURED_FILE in the version directory
MEASURED_FILE = "trident_measured.json"  # generated, per machine; not part of the committed config.pbtxt
PROVIDER = "execution_provider"      # "cpu" or "cuda"
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


def bucket_runner_arguments(params: dict, args: dict) -> dict:
    """The ort_runner.BucketRunner arguments (all but providers) that a model's parameters carry, as the builder's
    _bucket_runner_parameters writes them: each bucket's file in the model's version directory, the threads, the row
    shards and their bucket limit, and each bucket's engine."""
    directory = os.path.join(args["model_repository"], args["model_version"])
    shard_limit = params.get(SHARD_LIMIT, "0")
    if shard_limit == "measured":
        path = os.path.join(directory, MEASURED_FILE)
        try:
            with open(path) as f:
                shard_limit = json.load(f)["shard_limit"]
        except (OSError, ValueError, KeyError, TypeError) as e:  # the file is per machine and git-ignored
            raise RuntimeError(f"{path}: the model's shard limit is 'measured' but this file cannot be read "
                                 f"({type(e).__name__}: {e}); rebuild the repository here with `trident serve build` "
                                 "(it measures the limit and writes the file) or build it with --shard-limit N") from None
    return {"files": {int(bucket): os.path.join(directory, file) for bucket, file in json.loads(params[FILES]).items()},
            "threads": int(params.get(THREADS, "0")), "row_shards": int(params.get(SHARDS, "0")),
            "engines": json.loads(params.get(ENGINES, "{}")), "shard_limit": int(shard_limit)}


def error_response(message: str, invalid_argument: bool = True, code_name: str | None = None):
    """An InferenceResponse that carries only an error: INVALID_ARG (or the TritonError code `code_name`, e.g.
    "UNAVAILABLE") where this Triton has that code, else the default (INTERNAL)."""
    import triton_python_backend_utils as pb_utils

    code_name = code_name or ("INVALID_ARG" if invalid_argument else None)
    code = getattr(pb_utils.TritonError, code_name, None) if code_name else None
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
