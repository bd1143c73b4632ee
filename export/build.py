"""Checkpoints -> exports -> a Triton model repository, exporting only what is not cached (the demo's one call).

Here, not in serving/, because exporting needs torch: serving/server/repository.py builds a repository from export
folders alone, and reaches this module only through serving/toolchain.py.
"""
from __future__ import annotations

from pathlib import Path

from trident.serving.errors import ExportMetadataError
from trident.serving.files import file_sha256
from trident.serving.server.repository import RepositoryError, build_repository, default_precision
from trident.serving.spec import load_export_metadata


def ensure_export(checkpoint: Path, exports_root: Path, kind: str, buckets=None, fp16: bool = False,
                  log=print) -> Path:
    """The export directory of a checkpoint, exporting it only when no export of these exact bytes is cached.

    Cached as <exports_root>/<kind>-<sha256[:12]>[-b<buckets>][-fp16]/. A cached export that this trident cannot
    read (an older export format), or whose int8 graphs another quantization method made, is exported again.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise RepositoryError(f"{checkpoint} not found: train it with `trident train {kind} --out "
                              f"{checkpoint.parent}` or put the shipped checkpoint there")
    digest = file_sha256(checkpoint)
    name = f"{kind}-{digest[:12]}"
    if buckets is not None:
        name += "-b" + "_".join(str(int(b)) for b in sorted(set(buckets)))
    if fp16:
        name += "-fp16"
    directory = Path(exports_root) / name
    if (directory / "metadata.json").is_file():
        try:
            meta = load_export_metadata(directory)
        except ExportMetadataError as e:
            log(f"re-exporting: {e}")
        else:
            from trident.export.quantize import METHOD as INT8_METHOD

            same_int8 = meta.get("int8", {}).get("method", INT8_METHOD) == INT8_METHOD
            if meta.get("source_checkpoint", {}).get("sha256") == digest and same_int8:
                return directory
            if not same_int8:
                log(f"re-exporting {directory.name}: its int8 graphs were made by another quantization method")
    from trident.export.onnx_export import export_checkpoint  # torch: only when there is something to export

    log(f"exporting {checkpoint} -> {directory}")
    export_checkpoint(checkpoint, directory, buckets=None if buckets is None else list(buckets), fp16=fp16, log=log)
    return directory


def default_build(checkpoints_root: Path = Path("checkpoints"), out: Path = Path("model_repository"),
                  work: Path = Path(".trident"), *, kinds: tuple[str, ...] = ("diffusion", "gan", "vae"),
                  buckets=None, log=print, **build_options) -> list[str]:
    """Export <checkpoints_root>/<kind>/model.safetensors for each kind (cached under <work>/exports) and build `out`.

    build_options go to build_repository (flavour, gpu, fp16, max_batch_size, max_queue_delay_us, intra_op_threads,
    row_shards, server_loop, precision_choice: default "auto" where it chooses, see default_precision).
    """
    fp16 = bool(build_options.get("fp16", False))
    build_options.setdefault("precision_choice", default_precision(build_options.get("flavour", "embedded"),
                                                                   bool(build_options.get("gpu", False))))
    dirs = [ensure_export(Path(checkpoints_root) / kind / "model.safetensors", Path(work) / "exports", kind,
                          buckets=buckets, fp16=fp16, log=log) for kind in kinds]
    names = build_repository(dirs, out, log=log, **build_options)
    log(f"wrote {out}: {', '.join(names)}")
    return names
