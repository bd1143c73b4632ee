"""How one served model runs one exported graph: the runtime manifest, built once and read wherever the graph runs.

serving/manifest.py `graph_runtime` makes a GraphRuntime from an export's metadata (parsed once, serving/manifest.py
`Export`) and the options of the build or of the in-process backend; the in-process backend runs it as it is, and
`trident serve build` writes it into config.pbtxt as one parameter (protocol.RUNTIME), which the Triton models read
back with GraphRuntime.from_json: this file is copied into every Python-backend model folder, as card.py is. So
there is one list of fields (bucket variants, files, engines, threads, row shards, shard limit, tensors, input
ranges), one JSON form and one parser; the tensors carry their role, so a model binds its inputs by role and name,
never by position.

What the build measures on its own machine (the row shards' bucket limit, and under `--precision auto` the variant
of each bucket, with the trials behind them) is not in the configuration, so a committed config.pbtxt is the same
wherever it is rebuilt: it goes into MEASURED_FILE beside the graph files (Measured), and a GraphRuntime whose
shard_limit, or a bucket whose variant, is MEASURED reads it from there.

Standard library and numpy only; a bad manifest is a plain ValueError naming every problem (callers in the package wrap it).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

import numpy as np

MEASURED_FILE = "trident_measured.json"  # generated beside a model's graph files, per machine; never in config.pbtxt
MEASURED = "measured"  # GraphRuntime.shard_limit, Bucket.variant: the build measured it, and MEASURED_FILE holds it
PROVIDERS = ("cpu", "cuda")  # where a model's ONNX Runtime sessions run (ort_runner.execution_providers)

# What each tensor of a graph is, whatever it is named (spec.py gives every tensor one): models and clients bind a
# graph's inputs and outputs by role.
NOISY_SAMPLE = "noisy_sample"  # U-Net: x_t
TIMESTEP = "timestep"          # U-Net: t, fractions allowed
CLASS_LABEL = "class_label"    # U-Net, generator: a class id (the U-Net also takes its null class)
GUIDANCE = "guidance"          # a distilled student's U-Net: the guidance scale w of each row
PREDICTION = "prediction"      # U-Net: what it predicts (card.prediction_type)
LATENT = "latent"              # generator, decoder: z
IMAGE = "image"                # generator, decoder output; encoder input
MEAN, LOGVAR = "mean", "logvar"  # encoder: the posterior's parameters
ROLES = (NOISY_SAMPLE, TIMESTEP, CLASS_LABEL, GUIDANCE, PREDICTION, LATENT, IMAGE, MEAN, LOGVAR)


def feed_by_role(graph: str, inputs, values: dict) -> dict:
    """{input name: contiguous array in the input's dtype} from {role: array}: every input of a graph bound by its
    role (inputs: Tensor or spec.TensorSpec), so a graph that gains an input asks for its value here by name."""
    missing = sorted(t.role for t in inputs if t.role not in values)
    extra = sorted(set(values) - {t.role for t in inputs})
    if missing or extra:
        raise ValueError(f"{graph} takes inputs of roles {[t.role for t in inputs]}; missing {missing}, not taken "
                         f"{extra}")
    return {t.name: np.ascontiguousarray(values[t.role], dtype=t.dtype) for t in inputs}


def _problems_of(cls, data, required: tuple[str, ...]) -> list[str]:
    if not isinstance(data, dict):
        return [f"{cls.__name__} is a JSON object, got {type(data).__name__}"]
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    missing = sorted(set(required) - set(data))
    return ([f"{cls.__name__}: unknown fields {unknown}"] if unknown else []) + (
        [f"{cls.__name__}: missing fields {missing}"] if missing else [])


@dataclass(frozen=True)
class Tensor:
    """One input or output: its name, numpy dtype name, per-item shape (the batch axis left out) and role."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    role: str

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "role": self.role}

    @classmethod
    def from_dict(cls, data: dict) -> "Tensor":
        problems = _problems_of(cls, data, ("name", "dtype", "shape", "role"))
        if problems:
            raise ValueError("; ".join(problems))
        return cls(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]), str(data["role"]))


@dataclass(frozen=True)
class InputRange:
    """The valid values of a label, timestep or guidance input: low <= x < high, or low <= x <= high where closed
    (a student's guidance range); hint says what they mean."""

    low: int | float
    high: int | float
    hint: str
    closed: bool = False

    def to_dict(self) -> dict:
        out = {"low": self.low, "high": self.high, "hint": self.hint}
        return {**out, "closed": True} if self.closed else out

    def outside(self, array: np.ndarray) -> np.ndarray:
        """bool, True where a value is not valid."""
        return (array < self.low) | ((array > self.high) if self.closed else (array >= self.high))

    def refusal(self, model: str, name: str, array) -> str | None:
        """The message that refuses an input holding a value outside the range (None when every value is valid):
        the one wording of the Triton models (batching.py) and the in-process backend."""
        array = np.asarray(array)
        outside = self.outside(array)
        if not np.any(outside):
            return None
        row = int(np.argwhere(outside)[0][0]) if array.ndim else 0
        return (f"{model}: input '{name}' must be in [{self.low}, {self.high}{']' if self.closed else ')'} "
                f"({self.hint}); got {array[outside].reshape(-1)[0].item()} at row {row}")


@dataclass(frozen=True)
class Bucket:
    """One static batch size and where its rows run: a graph file (path relative to the model's folder) on an
    ort_runner engine, as the precision variant chosen for it says (serving/precision.py); variant MEASURED alone:
    the variant `auto` measured on the serving machine (Measured.buckets); or, in the container flavour, a per-bucket
    Triton model called through BLS (model)."""

    size: int
    variant: str = ""
    file: str = ""
    engine: str = ""
    model: str = ""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != ""}


@dataclass(frozen=True)
class GraphRuntime:
    """One graph as a model runs it (see the module docstring). Frozen; not hashable (ranges is a dict).

    shard_limit: the largest bucket a row shard runs (0: every bucket), or MEASURED (in MEASURED_FILE)."""

    graph: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    buckets: tuple[Bucket, ...]
    ranges: dict[str, InputRange]
    threads: int = 0          # ONNX Runtime intra-op threads of a whole call (0: its default)
    row_shards: int = 0       # concurrent row shards on the CPU (0: one per core, 1: off)
    shard_limit: int | str = 0
    provider: str = "cpu"

    def __post_init__(self):
        problems = []
        sizes = [b.size for b in self.buckets]
        if not sizes or sizes != sorted(set(sizes)) or not all(isinstance(s, int) and s > 0 for s in sizes):
            problems.append(f"bucket sizes must be increasing positive integers, got {sizes}")
        for b in self.buckets:
            local, remote = all((b.variant, b.file, b.engine)), bool(b.model)
            measured = b.variant == MEASURED and not (b.file or b.engine or b.model)
            if not measured and (local == remote or (remote and (b.variant or b.file or b.engine))):
                problems.append(f"bucket {b.size} needs either variant, file and engine, a model, or variant "
                                f"{MEASURED!r} alone, got {b.to_dict()}")
        if len({bool(b.model) for b in self.buckets}) > 1:
            problems.append("every bucket runs on per-bucket models, or none does")
        for t in (*self.inputs, *self.outputs):
            if t.role not in ROLES:
                problems.append(f"tensor {t.name!r} has unknown role {t.role!r}; expected one of {ROLES}")
        names = [t.name for t in self.inputs]
        unknown = sorted(set(self.ranges) - set(names))
        if unknown:
            problems.append(f"ranges of inputs the graph does not take: {unknown}")
        if min(self.threads, self.row_shards) < 0:
            problems.append(f"threads and row_shards must be >= 0, got {self.threads}, {self.row_shards}")
        if self.shard_limit != MEASURED and not (isinstance(self.shard_limit, int) and self.shard_limit >= 0):
            problems.append(f"shard_limit must be a bucket size >= 0 or {MEASURED!r}, got {self.shard_limit!r}")
        if self.provider not in PROVIDERS:
            problems.append(f"provider must be one of {PROVIDERS}, got {self.provider!r}")
        if problems:
            raise ValueError(f"invalid runtime manifest of {self.graph}: " + "; ".join(problems))

    # -- what the runners need ---------------------------------------------------------------------------------------
    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(b.size for b in self.buckets)

    @property
    def bucket_models(self) -> dict[int, str] | None:
        """{bucket: per-bucket Triton model} where the rows run through BLS (container flavour), else None."""
        return {b.size: b.model for b in self.buckets} if self.buckets[0].model else None

    @property
    def variants(self) -> dict[int, str]:
        return {b.size: b.variant for b in self.buckets}

    def tensor(self, role: str) -> Tensor:
        """The input or output of this role (a graph has at most one of each)."""
        found = [t for t in (*self.inputs, *self.outputs) if t.role == role]
        if len(found) != 1:
            raise ValueError(f"{self.graph} has {len(found)} tensors of role {role!r}: "
                             f"{[t.name for t in (*self.inputs, *self.outputs)]}")
        return found[0]

    def feed(self, values: dict) -> dict:
        """The graph's inputs from {role: array} (feed_by_role)."""
        return feed_by_role(self.graph, self.inputs, values)

    @property
    def measured(self) -> bool:
        """Part of how it runs was measured on the serving machine (MEASURED_FILE holds it)."""
        return self.shard_limit == MEASURED or any(b.variant == MEASURED for b in self.buckets)

    def resolved(self, directory: str, measured: "Measured | None" = None) -> "GraphRuntime":
        """This manifest with what was measured filled in: from `measured`, else from MEASURED_FILE in `directory`
        (the model's version folder)."""
        if not self.measured:
            return self
        measured = measured or Measured.read(directory)
        limit = self.shard_limit
        if limit == MEASURED:
            if measured.shard_limit is None:
                raise RuntimeError(f"{os.path.join(directory, MEASURED_FILE)} holds no shard limit for {self.graph}; "
                                   "rebuild the repository here with `trident serve build` (it measures the limit), "
                                   "or build it with --shard-limit N")
            limit = measured.shard_limit
        chosen = {b.size: b for b in measured.buckets}
        buckets = []
        for b in self.buckets:
            if b.variant != MEASURED:
                buckets.append(b)
            elif b.size in chosen:
                buckets.append(chosen[b.size])
            else:
                raise RuntimeError(f"{os.path.join(directory, MEASURED_FILE)} holds no variant for bucket {b.size} "
                                   f"of {self.graph}; rebuild the repository here with `trident serve build`")
        return GraphRuntime(**{**{f.name: getattr(self, f.name) for f in fields(self)}, "buckets": tuple(buckets),
                               "shard_limit": limit})

    def runner_arguments(self, directory: str, measured: "Measured | None" = None) -> dict:
        """ort_runner.BucketRunner's arguments (all but providers) with the graph files under `directory` (the
        model's version folder, or the export folder), what was measured filled in (resolved)."""
        runtime = self.resolved(directory, measured)
        return {"files": {b.size: os.path.join(directory, b.file) for b in runtime.buckets},
                "engines": {b.size: b.engine for b in runtime.buckets}, "threads": runtime.threads,
                "row_shards": runtime.row_shards, "shard_limit": runtime.shard_limit}

    # -- JSON --------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"graph": self.graph, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "buckets": [b.to_dict() for b in self.buckets],
                "ranges": {name: r.to_dict() for name, r in self.ranges.items()}, "threads": self.threads,
                "row_shards": self.row_shards, "shard_limit": self.shard_limit, "provider": self.provider}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "GraphRuntime":
        """Strict: every unknown or missing field, here or in a tensor, bucket or range, is named at once."""
        problems = _problems_of(cls, data, ("graph", "inputs", "outputs", "buckets"))
        if not isinstance(data, dict):
            raise ValueError("invalid runtime manifest: " + "; ".join(problems))
        for key, kind in (("inputs", Tensor), ("outputs", Tensor), ("buckets", Bucket)):
            for item in data.get(key, ()):
                problems += _problems_of(kind, item, ("size",) if kind is Bucket else ("name", "dtype", "shape", "role"))
        for item in data.get("ranges", {}).values():
            problems += _problems_of(InputRange, item, ("low", "high", "hint"))
        if problems:
            raise ValueError("invalid runtime manifest: " + "; ".join(problems))
        try:
            return cls(graph=str(data["graph"]), inputs=tuple(Tensor.from_dict(t) for t in data["inputs"]),
                       outputs=tuple(Tensor.from_dict(t) for t in data["outputs"]),
                       buckets=tuple(Bucket(**b) for b in data["buckets"]),
                       ranges={name: InputRange(**r) for name, r in data.get("ranges", {}).items()},
                       **{k: data[k] for k in ("threads", "row_shards", "shard_limit", "provider") if k in data})
        except (TypeError, AttributeError) as e:
            raise ValueError(f"invalid runtime manifest: {type(e).__name__}: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "GraphRuntime":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid runtime manifest: not JSON ({e})") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class Measured:
    """What the build measured for one graph on the machine that serves it (MEASURED_FILE): the row shards' bucket
    limit and the trial that chose it (serving/precision.py shard_trial; None where calls are not sharded, or the
    limit was not measured), and under `--precision auto` each bucket's variant and file (buckets) with the record of
    the choice (precision.choose: every trial number, every variant not offered and why)."""

    shard_limit: int | None = None
    shard_trial: dict | None = None
    buckets: tuple[Bucket, ...] = ()
    precision: dict | None = None

    def to_json(self) -> str:
        return json.dumps({"shard_limit": self.shard_limit, "shard_trial": self.shard_trial,
                           "buckets": [b.to_dict() for b in self.buckets], "precision": self.precision},
                          indent=2) + "\n"

    @classmethod
    def read(cls, directory: str) -> "Measured":
        path = os.path.join(directory, MEASURED_FILE)
        try:
            with open(path) as f:
                data = json.load(f)
            limit = data.get("shard_limit")
            return cls(None if limit is None else int(limit), data.get("shard_trial"),
                       tuple(Bucket(**b) for b in data.get("buckets", ())), data.get("precision"))
        except (OSError, ValueError, KeyError, TypeError) as e:  # the file is per machine and git-ignored
            raise RuntimeError(f"{path}: how the model runs was measured on the machine that built it (shard limit, "
                               f"auto precision) but this file cannot be read ({type(e).__name__}: {e}); rebuild the "
                               "repository here with `trident serve build` (it measures and writes the file), or "
                               "build it with --shard-limit N and a fixed --precision") from None
