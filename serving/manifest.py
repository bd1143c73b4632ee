"""An export's metadata.json as types, and the one function that says how a graph of it runs.

    load_export(directory)                      metadata.json, parsed once: Export -> ExportGraph -> GraphFile
    RuntimeOptions(...)                         precision, threads, row shards, shard limit, device: checked once
    measure(export, graph, options)             the trials on this machine ("auto" precision and shard limit)
    graph_runtime(export, graph, options, ...)  pure: the graph's GraphRuntime (serving/graph_runtime.py)

`trident serve build` (serving/server/repository.py) and the in-process backend (serving/client/backends.py) both go
through these four, so every choice about how a graph runs (precision aliases, which file and engine a variant
means, what an "auto" shard limit is on a GPU, the input ranges) is made here once. Core: numpy only, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import precision as precisions
from .card import ModelCard
from .errors import ExportMetadataError
from .graph_runtime import CLASS_LABEL, GUIDANCE, MEASURED, TIMESTEP, Bucket, GraphRuntime, InputRange, Measured, Tensor
from .spec import GraphSpec, export_card, graph_spec_of, load_export_metadata

__all__ = ["Export", "ExportGraph", "GraphFile", "Measurement", "RuntimeOptions", "graph_runtime", "input_ranges",
           "load_export", "measure"]


# ---------------------------------------------------------------------------------------------------------------------
# metadata.json
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphFile:
    """One exported ONNX file: its path relative to the export folder (also its path in a model's version folder)."""

    file: str
    sha256: str


@dataclass(frozen=True)
class ExportGraph:
    """One graph of an export: its spec (checked against the one the export recorded), static batch sizes, the
    files of each exported precision ("fp32", "fp16", "int8": {bucket: GraphFile}) and its fixed parity batch."""

    name: str
    spec: GraphSpec
    buckets: tuple[int, ...]
    files: dict[str, dict[int, GraphFile]]
    parity_inputs: str | None = None
    int8_refused: str | None = None  # why the export holds no int8 graphs of it though it quantized (None: it does)

    def file(self, variant: str, bucket: int) -> GraphFile:
        """The file a variant (serving/precision.py) runs at a bucket."""
        return self.files[precisions.VARIANTS[variant].files][bucket]


@dataclass(frozen=True)
class Export:
    """A `trident export` folder: its model card, its graphs, and what the precision choice reads."""

    directory: Path
    card: ModelCard
    graphs: dict[str, ExportGraph]
    checkpoint_sha256: str | None = None
    int8_method: str | None = None


def load_export(directory) -> Export:
    """Parse an export's metadata.json (ExportMetadataError naming the file and what to do when it is unusable)."""
    info = load_export_metadata(directory)
    card = export_card(info, Path(directory) / "metadata.json")
    graphs = {}
    for name, entry in info["graphs"].items():
        spec = graph_spec_of(name, card)
        if spec.to_dict() != entry.get("spec"):
            raise ExportMetadataError(f"{directory}: {name}: the export recorded tensors {entry.get('spec')} but this "
                                      f"trident's spec is {spec.to_dict()}; re-export the checkpoint with this version")
        files = {p: {int(b): GraphFile(f["file"], f["sha256"]) for b, f in entry[p].items()}
                 for p in ("fp32", "fp16", "int8") if entry.get(p)}
        graphs[name] = ExportGraph(name, spec, tuple(sorted(int(b) for b in entry["buckets"])), files,
                                   entry.get("parity_inputs"), entry.get("int8_refused"))
    return Export(Path(directory), card, graphs, info.get("source_checkpoint", {}).get("sha256"),
                  info.get("int8", {}).get("method"))


# ---------------------------------------------------------------------------------------------------------------------
# Options, trials, and the runtime manifest
# ---------------------------------------------------------------------------------------------------------------------

PRECISION_ALIASES = {"fp32": precisions.REFERENCE, "fp16": "onnxruntime-fp16"}


@dataclass(frozen=True)
class RuntimeOptions:
    """How the graphs run, checked once (ValueError naming the option; callers raise their own TridentError).

    precision   a variant of serving/precision.py for every bucket, "fp32"/"fp16" (aliases, resolved here), or
                "auto": per graph and bucket, measured (measure)
    threads     ONNX Runtime intra-op threads of a whole call (0: its default)
    row_shards  concurrent row shards on the CPU (0: one per core, 1: off)
    shard_limit the largest bucket a row shard runs (0: every bucket), or "auto": measured on the CPU; a GPU runs one
                call at a time, so there it means 0
    gpu         the sessions run on CUDA (fp32 or fp16 variants only)
    quality_gate the quality gate's verdicts file that "auto" reads (None: none, so no reduced precision)
    """

    precision: str = precisions.REFERENCE
    threads: int = 0
    row_shards: int = 0
    shard_limit: int | str = 0
    gpu: bool = False
    quality_gate: Path | None = precisions.DEFAULT_QUALITY_GATE

    def __post_init__(self):
        object.__setattr__(self, "precision", PRECISION_ALIASES.get(self.precision, self.precision))
        if self.precision not in precisions.CHOICES:
            raise ValueError(f"precision must be fp32, fp16 or one of {precisions.CHOICES}, got {self.precision!r}")
        if self.gpu and self.precision not in (precisions.REFERENCE, "onnxruntime-fp16"):
            raise ValueError(f"precision {self.precision} runs on the CPU; on a GPU use fp32 or fp16")
        precisions.check_shard_limit(self.shard_limit)
        if self.threads < 0 or self.row_shards < 0:
            raise ValueError(f"threads and row_shards must be >= 0 (0: automatic), got {self.threads} and "
                             f"{self.row_shards}")

    @property
    def measures_shard_limit(self) -> bool:
        return self.shard_limit == "auto" and not self.gpu


@dataclass(frozen=True)
class Measurement:
    """What measure() found for one graph on this machine: precisions.choose's record ({"choice": {bucket:
    variant}, and for "auto" every trial number and why a variant was not offered}) and the shard limit's trial."""

    record: dict
    measured: Measured | None = None

    @property
    def choice(self) -> dict[int, str]:
        return {int(b): v for b, v in self.record["choice"].items()}


def measure(export: Export, graph: str, options: RuntimeOptions, log=None) -> Measurement:
    """The trials `auto` needs, on this machine (none for a fixed precision and shard limit)."""
    record = precisions.choose(export, graph, options.precision, gate_file=options.quality_gate,
                              threads=options.threads, row_shards=options.row_shards, log=log)
    measured = None
    if options.measures_shard_limit:  # over the buckets that run on onnxruntime (the ones row shards run)
        trial = precisions.measure_shard_limit(export, graph, record["choice"], threads=options.threads,
                                              row_shards=options.row_shards, log=log)
        measured = Measured(trial["limit"] if trial else 0, trial)
    if options.precision == "auto":  # the choice, with every trial number: what the generated file records
        choice = {int(b): v for b, v in record["choice"].items()}
        entry = export.graphs[graph]
        buckets = tuple(Bucket(n, variant=v, file=entry.file(v, n).file, engine=precisions.VARIANTS[v].engine)
                        for n, v in sorted(choice.items()))
        measured = Measured(measured.shard_limit if measured else None, measured.shard_trial if measured else None,
                            buckets, record)
    return Measurement(record, measured)


def input_ranges(spec: GraphSpec, card: ModelCard) -> dict[str, InputRange]:
    """Valid values of a graph's class label, timestep and guidance inputs (by role): low <= x < high, or
    low <= x <= high for the guidance scale (closed)."""
    ranges = {}
    for tensor in spec.inputs:
        if tensor.role == CLASS_LABEL:
            classes = len(card.class_names)
            if card.null_class is not None:  # diffusion: the extra row of the class embedding is the null class
                ranges[tensor.name] = InputRange(0, card.null_class + 1, f"a class id 0..{classes - 1}, or "
                                                 f"{card.null_class} for the null class (unconditional)")
            else:
                ranges[tensor.name] = InputRange(0, classes, f"a class id 0..{classes - 1}")
        elif tensor.role == TIMESTEP:
            steps = card.num_train_timesteps
            ranges[tensor.name] = InputRange(0, steps, f"a diffusion timestep of the {steps}-step training schedule, "
                                                       "fractions allowed")
        elif tensor.role == GUIDANCE:  # a student never saw a w outside the range it was distilled on
            low, high = card.guidance_range
            ranges[tensor.name] = InputRange(low, high, "the guidance scales this student was distilled for",
                                             closed=True)
    return ranges


def graph_runtime(export: Export, graph: str, options: RuntimeOptions, choice: dict[int, str] | None = None, *,
                  models: dict[int, str] | None = None, as_measured: bool = False) -> GraphRuntime:
    """How a graph of an export runs: pure, the same for `trident serve build` and the in-process backend.

    choice: {bucket: variant} (measure()'s; default options.precision at every bucket, which must not be "auto");
    models: {bucket: per-bucket Triton model} instead, where the rows run through BLS (container flavour);
    as_measured: under "auto", every bucket's variant is MEASURED (the build's config.pbtxt: the choice goes into the
    generated MEASURED_FILE, so the configuration is the same on every machine)."""
    entry = export.graphs[graph]
    if models is not None:
        if sorted(models) != list(entry.buckets):
            raise ValueError(f"{graph}: per-bucket models {sorted(models)} do not match the buckets "
                             f"{list(entry.buckets)}")
        buckets = tuple(Bucket(n, model=models[n]) for n in entry.buckets)
    else:
        if choice is None and options.precision == "auto":
            raise ValueError(f"{graph}: precision 'auto' needs the choice measure() made")
        choice = choice or dict.fromkeys(entry.buckets, options.precision)
        if not set(choice) <= set(entry.buckets):
            raise ValueError(f"{graph}: a precision choice for buckets {sorted(choice)}, the export has "
                             f"{list(entry.buckets)}")
        for variant in sorted(set(choice.values())):
            files = precisions.VARIANTS[variant].files
            if files not in entry.files:
                raise ValueError(precisions.missing_files(graph, variant, entry.int8_refused))
        buckets = tuple(Bucket(n, variant=v, file=entry.file(v, n).file, engine=precisions.VARIANTS[v].engine)
                        for n, v in sorted(choice.items()))
        if as_measured and options.precision == "auto":
            buckets = tuple(Bucket(b.size, variant=MEASURED) for b in buckets)
    shard_limit = MEASURED if options.measures_shard_limit else (0 if options.shard_limit == "auto"
                                                                 else options.shard_limit)
    tensors = lambda ts: tuple(Tensor(t.name, t.dtype, t.shape, t.role) for t in ts)  # noqa: E731
    return GraphRuntime(graph, tensors(entry.spec.inputs), tensors(entry.spec.outputs), buckets,
                        input_ranges(entry.spec, export.card), threads=options.threads, row_shards=options.row_shards,
                        shard_limit=shard_limit, provider="cuda" if options.gpu else "cpu")
