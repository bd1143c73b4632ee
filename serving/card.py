"""The model card: everything a consumer of a trained generator needs to know about it, as one frozen dataclass.

Built once by `trident train` and stored in the checkpoint's header; the exporter adds the buckets it exported and
writes it into metadata.json; the repository builder carries it to Triton as one model parameter (`trident_card`,
serving/server/runtime/protocol.py); every backend (in-process ONNX Runtime, Triton over HTTP or gRPC, PyTorch)
parses it back into the same object, and the Triton models read it too. So there is one list of fields, one JSON form and one parser.

Copied into Triton model folders (see serving/server/runtime): standard library only, and a bad card is a plain
ValueError naming the field (callers inside the package turn it into their own TridentError).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace

KINDS = ("diffusion", "diffusion_student", "gan", "vae", "classifier")
# Diffusion models: the teacher (a class-conditional U-Net, guided by the [cond; null] pair) and the student distilled
# from it (training/distill.py), whose U-Net takes the guidance scale as an input (one row per image per step) and is
# served beside the teacher under its own names (spec.DIFFUSION_MODELS).
DIFFUSION_KINDS = ("diffusion", "diffusion_student")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a diffusion U-Net predicts (diffusers' names)


@dataclass(frozen=True)
class ImageFormat:
    """What the generator draws: (channels, height, width) floats in value_range."""

    channels: int
    height: int
    width: int
    value_range: tuple[float, float] = (-1.0, 1.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        return {"channels": self.channels, "height": self.height, "width": self.width,
                "value_range": list(self.value_range)}


@dataclass(frozen=True)
class ModelCard:
    """One model's card. Fields that do not apply to a kind are None (schedule for a GAN, latent_dim for diffusion).

    Frozen; not hashable (schedule and buckets are dicts).
    """

    kind: str                                   # KINDS: "diffusion", "diffusion_student", "gan", "vae", ...
    class_names: tuple[str, ...]
    image: ImageFormat
    conditional: bool                           # takes class labels (diffusion, GAN)
    schedule: dict | None = None                # diffusion: sampling.NoiseSchedule.to_dict()
    prediction_type: str | None = None          # diffusion: what the U-Net predicts (PREDICTION_TYPES)
    null_class: int | None = None               # diffusion: the label of "no class" (classifier-free guidance)
    latent_dim: int | None = None               # GAN, VAE: size of z
    class_centroids: tuple[tuple[float, ...], ...] | None = None  # VAE: mean latent of each class's training images
    buckets: dict[str, tuple[int, ...]] = field(default_factory=dict)  # {graph: static batch sizes}, set at export
    # diffusion_student only: the guidance scales w it was distilled on, (min, max) inclusive: its U-Net takes w as an
    # input, and a w outside is refused (it never saw one)
    guidance_range: tuple[float, float] | None = None
    # diffusion_student only: the DDIM step count ("trailing" spacing) it was step-distilled for, its default; None for
    # a student distilled for guidance alone (it samples as its teacher does)
    distilled_steps: int | None = None

    def __post_init__(self):
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.class_names or not all(isinstance(n, str) and n for n in self.class_names):
            problems.append(f"class_names must be non-empty strings, got {self.class_names!r}")
        if not all(isinstance(d, int) and d > 0 for d in self.image.shape):
            problems.append(f"image channels/height/width must be positive integers, got {self.image.shape}")
        lo, hi = self.image.value_range
        if not lo < hi:
            problems.append(f"image value_range must be (low, high) with low < high, got {self.image.value_range}")
        if self.kind in DIFFUSION_KINDS:
            if not isinstance(self.schedule, dict) or "num_train_timesteps" not in self.schedule:
                problems.append("a diffusion card needs a schedule with num_train_timesteps")
            if self.prediction_type not in PREDICTION_TYPES:
                problems.append(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
            if self.null_class != len(self.class_names):
                problems.append(f"null_class must be {len(self.class_names)} (one past the last class), "
                                f"got {self.null_class!r}")
        student = self.kind == "diffusion_student"
        if student != (self.guidance_range is not None):
            problems.append("guidance_range (min, max) belongs to a diffusion_student card (its U-Net takes the "
                            f"guidance scale), and every such card needs one; got {self.guidance_range!r} for kind "
                            f"{self.kind!r}")
        elif student:
            g = self.guidance_range
            if (isinstance(g, (tuple, list)) and len(g) == 2 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in g)
                    and 0 <= g[0] <= g[1]):
                object.__setattr__(self, "guidance_range", (float(g[0]), float(g[1])))
            else:
                problems.append(f"guidance_range must be (min, max) finite numbers with 0 <= min <= max, got {g!r}")
        if self.distilled_steps is not None and not (
                student and isinstance(self.distilled_steps, int) and not isinstance(self.distilled_steps, bool)
                and self.distilled_steps >= 1):
            problems.append(f"distilled_steps must be None or, for a diffusion_student, an integer >= 1; got "
                            f"{self.distilled_steps!r} for kind {self.kind!r}")
        if self.kind in ("gan", "vae") and not (isinstance(self.latent_dim, int) and self.latent_dim > 0):
            problems.append(f"a {self.kind} card needs latent_dim > 0, got {self.latent_dim!r}")
        if self.class_centroids is not None and (
                len(self.class_centroids) != len(self.class_names)
                or any(len(c) != self.latent_dim for c in self.class_centroids)):
            problems.append(f"class_centroids must be {len(self.class_names)} rows of latent_dim={self.latent_dim}")
        for graph, sizes in self.buckets.items():
            if not sizes or list(sizes) != sorted(set(sizes)) or not all(isinstance(b, int) and b > 0 for b in sizes):
                problems.append(f"buckets[{graph!r}] must be increasing positive integers, got {list(sizes)}")
        if problems:
            raise ValueError("invalid model card: " + "; ".join(problems))

    @property
    def diffusion(self) -> bool:
        """A diffusion model (teacher or student): it has a schedule and is sampled by serving/sampling.py."""
        return self.kind in DIFFUSION_KINDS

    @property
    def num_train_timesteps(self) -> int:
        return int(self.schedule["num_train_timesteps"])

    def with_buckets(self, buckets: dict[str, tuple[int, ...] | list[int]]) -> "ModelCard":
        return replace(self, buckets={g: tuple(int(b) for b in sizes) for g, sizes in buckets.items()})

    # -- JSON --------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON form (fields that are None are left out)."""
        out = {"kind": self.kind, "class_names": list(self.class_names), "image": self.image.to_dict(),
               "conditional": self.conditional}
        for name in ("schedule", "prediction_type", "null_class", "latent_dim"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.class_centroids is not None:
            out["class_centroids"] = [list(c) for c in self.class_centroids]
        if self.buckets:
            out["buckets"] = {g: list(sizes) for g, sizes in self.buckets.items()}
        if self.guidance_range is not None:
            out["guidance_range"] = list(self.guidance_range)
        if self.distilled_steps is not None:
            out["distilled_steps"] = self.distilled_steps
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "ModelCard":
        """Strict: a missing required field or an unknown one is a ValueError naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"a model card is a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(n for n in ("kind", "class_names", "image", "conditional") if n not in data)
        if unknown or missing:
            raise ValueError(f"invalid model card: unknown fields {unknown}, missing fields {missing}")
        try:
            im = data["image"]
            image = ImageFormat(int(im["channels"]), int(im["height"]), int(im["width"]),
                                tuple(float(v) for v in im.get("value_range", (-1.0, 1.0))))
            centroids = data.get("class_centroids")
            guidance_range = data.get("guidance_range")
            if guidance_range is not None:  # numbers stay as JSON gave them: __post_init__ names a bad one
                guidance_range = tuple(guidance_range)
            return cls(
                kind=data["kind"], class_names=tuple(data["class_names"]), image=image,
                conditional=bool(data["conditional"]), schedule=data.get("schedule"),
                prediction_type=data.get("prediction_type"),
                null_class=None if data.get("null_class") is None else int(data["null_class"]),
                latent_dim=None if data.get("latent_dim") is None else int(data["latent_dim"]),
                class_centroids=None if centroids is None else tuple(tuple(float(v) for v in c) for c in centroids),
                buckets={g: tuple(int(b) for b in sizes) for g, sizes in data.get("buckets", {}).items()},
                guidance_range=guidance_range, distilled_steps=data.get("distilled_steps"))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"invalid model card: {type(e).__name__}: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid model card: not JSON ({e})") from None
        return cls.from_dict(data)
