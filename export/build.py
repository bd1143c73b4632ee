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

KINDS = ("diffusion", "gan", "vae")  # what every build serves: their checkpoints must be there
# Served beside them when <checkpoints_root>/<kind>/model.safetensors is there: the distilled student (issue 19).
OPTIONAL_KINDS = ("diffusion_student",)


def how_to_make(kind: str, folder: Path) -> str:
    """The command that writes <folder>/model.safetensors for a kind of the checkpoints folder."""
    if kind == "diffusion_student":  # a student is distilled from the teacher (training/distill.py), not trained
        return f"trident distill steps STAGE1/model.safetensors --out {folder}"
    return f"trident train {kind} --out {folder}"


def ensure_export(checkpoint: Path, exports_root: Path, kind: str, buckets=None, fp16: bool = False,
                  log=print) -> Path:
    """The export directory of a checkpoint, exporting it only when no export of these exact bytes is cached.

    Cached as <exports_root>/<kind>-<sha256[:12]>[-b<buckets>][-fp16]/; kind names the checkpoints folder, so the
    student's exports ("diffusion_student-...") never take the teacher's names. A cached export that this trident
    cannot read (an older export format), or whose int8 graphs another quantization method made, is exported again.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise RepositoryError(f"{checkpoint} not found: make it with `{how_to_make(kind, checkpoint.parent)}` or put "
                              "the shipped checkpoint there")
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
                  work: Path = Path(".trident"), *, kinds: tuple[str, ...] = KINDS,
                  optional_kinds: tuple[str, ...] = OPTIONAL_KINDS, buckets=None, log=print,
                  **build_options) -> list[str]:
    """Export <checkpoints_root>/<kind>/model.safetensors for each kind, and for each of optional_kinds whose
    checkpoint is there (the student beside its teacher), cached under <work>/exports, and build `out`.

    build_options go to build_repository (flavour, gpu, fp16, max_batch_size, max_queue_delay_us, intra_op_threads,
    row_shards, server_loop, precision_choice: default "auto" where it chooses, see default_precision).
    """
    fp16 = bool(build_options.get("fp16", False))
    build_options.setdefault("precision_choice", default_precision(build_options.get("flavour", "embedded"),
                                                                   bool(build_options.get("gpu", False))))
    root = Path(checkpoints_root)
    kinds = (*kinds, *(k for k in optional_kinds if k not in kinds and (root / k / "model.safetensors").is_file()))
    dirs = [ensure_export(root / kind / "model.safetensors", Path(work) / "exports", kind, buckets=buckets, fp16=fp16,
                          log=log) for kind in kinds]
    names = build_repository(dirs, out, log=log, **build_options)
    log(f"wrote {out}: {', '.join(names)}")
    return names
