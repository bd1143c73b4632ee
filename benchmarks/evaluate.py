"""`trident evaluate`: what every generator draws, measured (the metrics are in training/quality.py).

  trident evaluate                                   # diffusion, DPM-Solver++(2M) 20 steps, guidance 3, n=1000
  trident evaluate --model gan|vae|ae                # the GAN, the VAE (z ~ N(0, I)), the plain autoencoder
  trident evaluate --sampler ddim --steps 50 --guidance 1.5
  trident evaluate --model diffusion_student --steps 4  # a distilled student (<checkpoints>/diffusion_student/)
  trident evaluate --url 127.0.0.1:8001 --protocol grpc   # draw through a Triton server instead of in-process
  trident evaluate --sweep                           # every setting; writes benchmarks/results/quality.{md,json,png}
  trident evaluate --sweep --merge diffusion_student # re-measure one model's settings, keep the rest of the report
  trident evaluate --precision-gate [--gate-models diffusion_student]  # bf16/int8 against fp32, per served model
  trident evaluate --model diffusion_student --guidance 1.5 --seeds 0,1,2 --against diffusion
                                                     # each seed, the spread, and the ratios to the teacher per seed

Images are drawn through the client SDK (in-process ONNX Runtime on exports of the checkpoints, cached in
.trident/exports, by default; a Triton server with --url) with a fixed seed, classes in equal shares, and judged by
the project's Fashion-MNIST classifier against the real test set. FD depends on n: compare figures at equal n only.
It also depends on the seed, which draws other noise and other real images to compare with: at n=1000 the shipped
models' FD moves 7.5-9.5 between seeds 0 and 1, more than many settings differ. --seeds measures each seed and the
spread; --against measures a second model at the same seeds, so ratios are taken seed by seed.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from trident.serving import precision, sampling
from trident.serving.client import TridentClient
from trident.serving.errors import TridentError
from trident.serving.files import atomic_file, file_sha256

from trident.training.quality import FeatureNet, RealReference, evaluate_images

MODELS = ("diffusion", "diffusion_student", "gan", "vae", "ae")
DIFFUSION = ("diffusion", "diffusion_student")  # drawn by client.sample (the student: model="diffusion_student")
STUDENT_STEPS = (1, 2, 4, 8)  # a student's steps in the sweep (issue 19: 4 the target, 1, 2 and 8 reported)
# The student's 4 steps also with guidance only at t >= this (its last step, t = 249, unguided): the limited
# interval of Kynkaanniemi et al. 2024, at the teacher's better of 150 and 300
# (checkpoints/diffusion_student_guidance/TRAINING.md, session 13)
STUDENT_GUIDANCE_T_MIN = 300
# The targets of a GAN worth serving (issue "Image quality, measured"), judged by check_gan_targets.
GAN_TARGETS = {"agreement": 0.95, "diversity": 0.70, "fd_vs_unguided_diffusion": 3.0}


# ----------------------------------------------------------------------------------------------------------------
# Settings: what to draw
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One thing to measure. diffusion: sampler, steps, guidance (variant "diffusers" = DDIM with the model's
    unclipped eps, diffusers' default; guidance_t_min: guidance only at the steps whose t >= it, SamplingConfig's);
    vae / ae: variant "prior" (decode z ~ N(0, I)), "fitted" (z from a Gaussian fitted to the training images'
    codes) or "midpoints" (decode the midpoint of two real test images' codes)."""

    model: str
    sampler: str = ""
    steps: int = 0
    guidance: float = 0.0
    variant: str = ""
    truncation: float = 0.0  # gan: z clipped to [-truncation, truncation] (the SDK's truncation); 0 = none
    guidance_t_min: int = 0  # diffusion: guidance only at t >= this (0 = every step)

    @property
    def label(self) -> str:
        if self.model in DIFFUSION:
            extra = " (diffusers DDIM)" if self.variant == "diffusers" else ""
            interval = f" t>={self.guidance_t_min}" if self.guidance_t_min else ""
            student = "student " if self.model == "diffusion_student" else ""
            return f"{student}{self.sampler}-{self.steps} g{self.guidance:g}{interval}{extra}"
        if self.truncation:
            return f"{self.model} truncation {self.truncation:g}"
        return self.model if not self.variant else f"{self.model} {self.variant}"

    @property
    def nfe(self) -> int:
        """Network evaluations per image (rows through the network; the teacher's guidance doubles them, in one call a
        step; a student takes the guidance scale as an input: one row per step). With guidance_t_min the teacher's
        unguided steps send one row: that count needs the timesteps, so measure() records the rows it sent."""
        if self.model not in DIFFUSION:
            return 1
        return self.steps * (1 if self.guidance == 1 or self.model == "diffusion_student" else 2)


def student_settings(sampler: str = "ddim") -> list[Setting]:
    """A distilled student's settings: its sampler (a step-distilled student's: DDIM on its trailing grid) at
    STUDENT_STEPS steps, at guidance 1.5 and 3 (where issue 19 compares it with the teacher), then its 4 steps with
    guidance only at t >= STUDENT_GUIDANCE_T_MIN."""
    return ([Setting("diffusion_student", sampler, s, g) for g in (1.5, 3.0) for s in STUDENT_STEPS]
            + [Setting("diffusion_student", sampler, 4, g, guidance_t_min=STUDENT_GUIDANCE_T_MIN) for g in (1.5, 3.0)])


def sweep_settings(include_ddpm_1000: bool = True, student: bool = False) -> list[Setting]:
    """The report's settings: each sampler over steps at guidance 3, each over guidance at 20 steps, DDIM as diffusers
    runs it, DDPM-1000 as the reference, the GAN, and the VAE next to the plain autoencoder; with student (a
    diffusion_student checkpoint is there), its student_settings."""
    out: list[Setting] = []
    for sampler in sampling.SAMPLERS:
        out += [Setting("diffusion", sampler, s, 3.0) for s in (5, 10, 20, 50)]
        out += [Setting("diffusion", sampler, 20, g) for g in (1.0, 1.5, 2.0, 5.0)]
    out += [Setting("diffusion", "ddim", s, 3.0, "diffusers") for s in (20, 50)]
    if include_ddpm_1000:
        out.append(Setting("diffusion", "ddpm", 1000, 3.0))
    out += [Setting("gan"), Setting("gan", truncation=1.5), Setting("gan", truncation=1.0),
            Setting("vae", variant="prior"), Setting("ae", variant="prior"), Setting("ae", variant="fitted"),
            Setting("vae", variant="midpoints"), Setting("ae", variant="midpoints")]
    return out + (student_settings() if student else [])


# ----------------------------------------------------------------------------------------------------------------
# Drawing through the SDK
# ----------------------------------------------------------------------------------------------------------------

class Clients:
    """One TridentClient per model, made on first use: in-process ONNX Runtime on exports of the checkpoints, or a
    Triton server for the served models (the autoencoder is not served: it always runs in-process)."""

    def __init__(self, checkpoints: dict[str, Path], work: Path, url: str | None = None, protocol: str = "http",
                 log=print, precision: str = "fp32"):
        self.checkpoints, self.work, self.url, self.protocol, self.log = checkpoints, Path(work), url, protocol, log
        self.precision = precision  # in-process: the runtime and precision every bucket runs (serving/precision.py)
        self._clients: dict[str, TridentClient] = {}
        self.exports: dict[str, Path] = {}  # model -> the export folder its in-process client runs

    def get(self, model: str) -> TridentClient:
        if model not in self._clients:
            if self.url is not None and model != "ae":
                self._clients[model] = TridentClient.connect(self.url, self.protocol)
            else:
                from trident.export.build import ensure_export

                kind = "vae" if model == "ae" else model
                export = self.exports[model] = ensure_export(self.checkpoints[model], self.work / "exports", kind,
                                                             log=self.log)
                self._clients[model] = TridentClient.from_onnx([export], precision=self.precision)
        return self._clients[model]

    def close(self):
        for c in self._clients.values():
            c.close()
        self._clients.clear()


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr)


def draw(clients: Clients, setting: Setting, n: int, seed: int = 0, batch: int = 100, ref: RealReference | None = None,
         progress: bool = False, rows: list[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """n images (float32 (n, C, H, W) in [-1, 1]) of a setting, and the requested classes (None: unconditional).
    Classes come in equal shares (image i asks for class i % k); batch b uses seed + b. rows: a list that gets the
    network rows each diffusion call sent."""
    client = clients.get(setting.model)
    kind = "vae" if setting.model == "ae" else setting.model
    k = len(client.class_names(kind))
    labels = np.arange(n) % k if setting.model in (*DIFFUSION, "gan") else None
    bar = _bar(n, setting.label, progress)
    chunks = []
    try:
        if setting.model in ("vae", "ae") and setting.variant in ("fitted", "midpoints"):
            chunks.append(_draw_latent(client, setting.variant, n, seed, ref))
            if bar is not None:
                bar.update(n)
        else:
            for i in range(0, n, batch):
                m = min(batch, n - i)
                if setting.model in DIFFUSION:
                    x = _sample(client, setting, labels[i:i + m], seed + i)
                    if rows is not None:
                        rows.append(client.last_stats.rows)
                elif setting.model == "gan":
                    x = client.generate(labels[i:i + m], seed=seed + i, truncation=setting.truncation or None,
                                        raw=True)
                else:
                    x = client.generate_vae(m, seed=seed + i, raw=True)
                chunks.append(x)
                if bar is not None:
                    bar.update(m)
    finally:
        if bar is not None:
            bar.close()
    return np.concatenate(chunks).astype(np.float32), labels


def _sample(client: TridentClient, s: Setting, labels, seed) -> np.ndarray:
    # the "diffusers" variant: DDIM as diffusers' DDIMScheduler runs it by default (use_clipped_model_output=False)
    options = {"use_clipped_model_output": False} if s.variant == "diffusers" else None
    return client.sample(labels, sampler="ddim" if options else s.sampler, steps=s.steps, guidance=s.guidance,
                         seed=seed, raw=True, sampler_options=options, model=s.model,
                         guidance_t_min=s.guidance_t_min)


def _draw_latent(client: TridentClient, variant: str, n: int, seed: int, ref: RealReference) -> np.ndarray:
    """fitted: decode z ~ N(mean, cov) of the encoder's codes of real training images (the fairest prior an
    autoencoder has); midpoints: decode the mean of the codes of two random real test images."""
    if ref is None:
        raise ValueError(f"the {variant!r} variant needs the real reference images")
    rng = np.random.default_rng(seed)
    if variant == "fitted":
        codes = np.concatenate([client.encode(ref.train_images[i:i + 1000]) for i in range(0, 10000, 1000)])
        z = rng.multivariate_normal(codes.mean(0), np.cov(codes, rowvar=False), size=n)
    else:
        a, b = rng.choice(len(ref.test_images), size=(2, n))
        za = np.concatenate([client.encode(ref.test_images[a[i:i + 1000]]) for i in range(0, n, 1000)])
        zb = np.concatenate([client.encode(ref.test_images[b[i:i + 1000]]) for i in range(0, n, 1000)])
        z = (za + zb) / 2
    return np.concatenate([client.decode(z[i:i + 1000], raw=True) for i in range(0, n, 1000)])


def measure(clients: Clients, setting: Setting, ref: RealReference, n: int, seed: int = 0, batch: int = 100,
            progress: bool = False) -> dict:
    """Draw one setting and judge it: the setting, its figures (training/quality.evaluate_images) and the time."""
    t0 = time.perf_counter()
    rows: list[int] = []
    images, labels = draw(clients, setting, n, seed, batch, ref, progress, rows)
    seconds = time.perf_counter() - t0
    result = evaluate_images(images, ref, labels, seed)
    nfe = round(sum(rows) / n, 2) if rows else setting.nfe  # what the client loop sent per image
    return {"label": setting.label, **asdict(setting), "nfe": int(nfe) if nfe == int(nfe) else nfe, **result,
            "draw_seconds": round(seconds, 1)}


SPREAD_KEYS = ("fd", "agreement", "recall", "precision")


def _span(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values))}


def across_seeds(clients: Clients, setting: Setting, ref: RealReference, n: int, seeds: list[int], batch: int = 100,
                 against: Setting | None = None, log=None) -> dict:
    """A setting measured at each seed, and the spread (mean, min, max) of its figures. With against: that setting
    too, at the same seeds (the same noise and the same real images), and per seed the FD ratio (setting / against)
    and the agreement difference (setting - against): the form in which a bound like "FD <= 1.1x the teacher's" can
    be checked, since the ratio at one seed moves less than either FD."""
    per_seed, nfe = [], {}
    for seed in seeds:
        r = measure(clients, setting, ref, n, seed, batch, progress=log is not None)
        nfe["setting"] = r["nfe"]  # the rows the loop sent per image (the same at every seed)
        row = {"seed": seed, **{k: r[k] for k in SPREAD_KEYS if k in r}, "fd_floor": ref.floor(n, seed),
               "draw_seconds": r["draw_seconds"]}
        if against is not None:
            a = measure(clients, against, ref, n, seed, batch, progress=log is not None)
            nfe["against"] = a["nfe"]
            row["against"] = {k: a[k] for k in (*SPREAD_KEYS, "draw_seconds") if k in a}
            row["fd_ratio"] = r["fd"] / a["fd"]
            if "agreement" in r and "agreement" in a:
                row["agreement_diff"] = r["agreement"] - a["agreement"]
        per_seed.append(row)
        if log is not None:
            log(f"seed {seed}: {setting.label} " + _brief(row)
                + (f"; {against.label} " + _brief(row["against"]) + f"; FD ratio {row['fd_ratio']:.3f}"
                   + (f", agreement {100 * row['agreement_diff']:+.1f} points" if "agreement_diff" in row else "")
                   if against is not None else ""))
    keys = [k for k in (*SPREAD_KEYS, "fd_ratio", "agreement_diff") if k in per_seed[0]]
    result = {"label": setting.label, **asdict(setting), "nfe": nfe["setting"], "n": n, "seeds": list(seeds),
              "per_seed": per_seed, "spread": {k: _span([row[k] for row in per_seed]) for k in keys}}
    if against is not None:
        result["against"] = {"label": against.label, **asdict(against), "nfe": nfe["against"],
                             "spread": {k: _span([row["against"][k] for row in per_seed])
                                        for k in SPREAD_KEYS if k in per_seed[0]["against"]}}
    return result


def _brief(r: dict) -> str:
    return f"FD {r['fd']:.1f}" + (f", agreement {r['agreement']:.3f}" if "agreement" in r else "") \
        + f", recall {r['recall']:.3f}"


def ae_vae_picture(clients: Clients, ref: RealReference, path: Path, seed: int = 0, per_row: int = 10) -> Path:
    """The picture of why the VAE exists: VAE and AE samples from z ~ N(0, I), then for three pairs of real test
    images the VAE's and the AE's decoded straight line between their codes."""
    from trident.serving.images import labelled_grid, save_png, to_uint8

    vae, ae = clients.get("vae"), clients.get("ae")
    rows, labels = [vae.generate_vae(per_row, seed=seed, raw=True), ae.generate_vae(per_row, seed=seed, raw=True)], \
        ["VAE N(0,I)", "AE N(0,I)"]
    pairs = np.random.default_rng(seed).choice(len(ref.test_images), size=(3, 2), replace=False)
    w = np.linspace(0.0, 1.0, per_row)[:, None]
    for i, (a, b) in enumerate(pairs):
        for name, client in (("VAE", vae), ("AE", ae)):
            za, zb = client.encode(ref.test_images[[a, b]])
            rows.append(client.decode((1 - w) * za + w * zb, raw=True))
            labels.append(f"{name} path {i + 1}")
    grid = labelled_grid(to_uint8(np.concatenate(rows)), per_row, labels, label_width=100)
    return save_png(path, grid)


# ----------------------------------------------------------------------------------------------------------------
# The quality gate of reduced precisions (serving/precision.py: `auto` offers only what passed it)
# ----------------------------------------------------------------------------------------------------------------

# Each served model's default setting. The student's is its own default sampler and steps at guidance 3, read from its
# card by gate_settings (a step-distilled student: DDIM at its distilled steps on the trailing grid; the 4-step one's
# below); it is gated where its checkpoint is there, and judged on its own graphs (serving/precision.py JUDGED_GRAPHS).
GATE_SETTINGS = {"diffusion": Setting("diffusion", "dpmpp-2m", 20, 3.0),
                 "diffusion_student": Setting("diffusion_student", "ddim", 4, 3.0),
                 "gan": Setting("gan"), "vae": Setting("vae", variant="prior")}
OPTIONAL_GATED = ("diffusion_student",)  # gated when <checkpoints>/<model>/model.safetensors is there
GATE_RULE = {"fd_ratio_max": 1.05, "agreement_drop_max": 0.01}
GATE_RULE_TEXT = ("FD within 5% of fp32's (fd <= 1.05 * fd_fp32) and class agreement at most 1 point below fp32's, "
                  "on the same n images drawn with the same seeds at the model's default setting")


def gate_verdict(fp32: dict, variant: dict, int8_method: str | None = None) -> dict:
    """Whether a reduced-precision variant draws as well as fp32 (GATE_RULE), with the figures it was judged on.
    int8_method: for an int8 variant, how its graphs were quantized (the export's metadata.json "int8": {"method"}):
    `auto` counts the verdict only for exports quantized the same way (serving/precision.py gate_reasons)."""
    fd_ratio = variant["fd"] / fp32["fd"]
    ok = fd_ratio <= GATE_RULE["fd_ratio_max"]
    out = {"fd": variant["fd"], "fd_fp32": fp32["fd"], "fd_ratio": round(fd_ratio, 4)}
    if "agreement" in fp32:
        drop = fp32["agreement"] - variant["agreement"]
        ok = ok and drop <= GATE_RULE["agreement_drop_max"]
        out.update(agreement=variant["agreement"], agreement_fp32=fp32["agreement"], agreement_drop=round(drop, 4))
    return {**out, "pass": bool(ok), "draw_seconds": variant["draw_seconds"],
            "draw_seconds_fp32": fp32["draw_seconds"], **({"int8_method": int8_method} if int8_method else {})}


def gate_settings(checkpoints: dict[str, Path], models: tuple[str, ...] | None = None) -> dict[str, Setting]:
    """What `--precision-gate` draws: GATE_SETTINGS for `models` (default: all of them), leaving out an OPTIONAL_GATED
    model whose checkpoint is not there; a student at the sampler and steps its card gives (default_sampling)."""
    out = {}
    for model in GATE_SETTINGS if models is None else models:
        setting, path = GATE_SETTINGS[model], checkpoints.get(model)
        if model in OPTIONAL_GATED and (path is None or not path.is_file()):
            if models is None:
                continue
            raise ValueError(f"{path or model} not found: the gate cannot judge {model} without its checkpoint")
        if model == "diffusion_student":
            default = default_sampling(model, checkpoints[model])
            setting = replace(setting, sampler=default["sampler"], steps=default["steps"])
        out[model] = setting
    return out


def precision_gate(checkpoints: dict[str, Path], work: Path, ref: RealReference, n: int, seed: int, batch: int,
                   variants: tuple[str, ...], gate_file: Path, log=print,
                   settings: dict[str, Setting] | None = None) -> dict:
    """Draw each served model's default setting (settings; default gate_settings(checkpoints)) at fp32 and at each
    reduced-precision variant (in-process, the same seeds), judge each against fp32, and merge the verdicts into
    gate_file (keyed by checkpoint sha256: the verdicts of checkpoints not drawn here stay)."""
    from trident.serving.spec import export_card, load_export_metadata

    settings = gate_settings(checkpoints) if settings is None else settings
    data = json.loads(gate_file.read_text()) if gate_file.is_file() else {}
    data["rule"] = GATE_RULE_TEXT
    data.pop("machine", None)  # each entry names the machine that drew it (files before that had one for all)
    machine, date = precision.cpu_info(), datetime.date.today().isoformat()
    entries = data.setdefault("checkpoints", {})
    for model, setting in settings.items():
        measured, int8_method = {}, {}
        for variant in ("onnxruntime-fp32", *variants):
            clients = Clients(checkpoints, work, log=log, precision=variant)
            try:
                measured[variant] = measure(clients, setting, ref, n, seed, batch, progress=True)
            finally:
                clients.close()
            if precision.precision_of(variant) == "int8":
                int8_method[variant] = load_export_metadata(clients.exports[model]).get("int8", {}).get("method")
            log(f"{model} {variant}: " + _summary(measured[variant]))
        fp32 = measured.pop("onnxruntime-fp32")
        # a diffusion model's default sampling (what was drawn here: gate_settings) walks these timesteps
        timesteps = precision.gated_timesteps(export_card(load_export_metadata(clients.exports[model])))
        entries[file_sha256(checkpoints[model])] = {
            "kind": model, "checkpoint": str(checkpoints[model]), "setting": setting.label, "n": n, "seed": seed,
            **({"timesteps": timesteps} if timesteps is not None else {}),
            "machine": machine, "date": date,  # a verdict is what these runtimes drew on this CPU's instructions
            "fp32": {k: fp32[k] for k in ("fd", "agreement", "precision", "recall", "brightness", "draw_seconds")
                     if k in fp32},
            "variants": {v: gate_verdict(fp32, r, int8_method.get(v)) for v, r in measured.items()}}
    gate_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(gate_file) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return data


def check_gan_targets(gan: dict, unguided: dict) -> dict:
    """The GAN targets against measured figures at equal n: class agreement, within-class diversity (a ratio to real
    data) and FD relative to unguided DPM-Solver++-20 diffusion."""
    ratio = gan["fd"] / unguided["fd"]
    return {"agreement": (gan["agreement"], gan["agreement"] >= GAN_TARGETS["agreement"]),
            "diversity": (gan["diversity"], gan["diversity"] >= GAN_TARGETS["diversity"]),
            "fd_vs_unguided_diffusion": (ratio, ratio <= GAN_TARGETS["fd_vs_unguided_diffusion"])}


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trident evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="diffusion",
                   help="diffusion_student: a distilled student, <checkpoints>/diffusion_student/model.safetensors")
    p.add_argument("--sampler", choices=sampling.SAMPLERS, default=None,
                   help="default: dpmpp-2m; a step-distilled student: ddim (its trailing grid)")
    p.add_argument("--steps", type=int, default=None,
                   help="default: 20; a step-distilled student: the steps it was distilled for")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--guidance-t-min", type=int, default=0, metavar="T",
                   help="diffusion: guidance only at the steps whose timestep is >= T (0 = every step); "
                        "--against draws with guidance at every step")
    p.add_argument("--truncation", type=float, default=0.0, help="gan: clip z to [-T, T] (0 = none)")
    p.add_argument("--variant", default="", help="vae/ae: prior (default), fitted, midpoints; diffusion: diffusers "
                                                 "(DDIM with the unclipped eps)")
    p.add_argument("--n", type=int, default=1000, help="images per setting (FD depends on n: compare at equal n)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0)
    seeds.add_argument("--seeds", default=None,
                       help="comma-separated seeds: measure the setting at each, with the spread (mean, min, max)")
    p.add_argument("--against", choices=DIFFUSION, default=None,
                   help="diffusion models: also measure this model (its default sampler and steps, the same "
                        "guidance) at the same seeds, and report FD ratio and agreement difference per seed")
    p.add_argument("--batch", type=int, default=100, help="images per SDK call")
    p.add_argument("--checkpoints", default="checkpoints", help="folder with <model>/model.safetensors")
    p.add_argument("--classifier", default=None, help="default: <checkpoints>/classifier/model.safetensors")
    p.add_argument("--work", default=".trident", help="export and feature cache")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder")
    p.add_argument("--url", default=None, help="draw the served models through this Triton server")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the classifier")
    p.add_argument("--sweep", action="store_true", help="measure every setting and write the report")
    p.add_argument("--no-ddpm-1000", action="store_true", help="--sweep without the DDPM-1000 reference (~70%% of "
                                                                 "the sweep's time)")
    p.add_argument("--out", default="benchmarks/results", help="--sweep: report folder")
    p.add_argument("--fresh", action="store_true", help="--sweep: re-measure settings whose results are cached")
    p.add_argument("--merge", default=None,
                   help="--sweep: re-measure only these models' settings (comma-separated) and keep every other "
                        "result of --out's quality.json, which must be at the same n, seed, batch and backend and, "
                        "where it records them, on the same checkpoints")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--precision", default="fp32",
                   help="in-process: the runtime and precision of every bucket (fp32, openvino-bf16, "
                        "onnxruntime-int8, ...; serving/precision.py)")
    p.add_argument("--precision-gate", action="store_true",
                   help="judge each reduced precision against fp32 on --n images per served model and write "
                        "--gate-file (what `--precision auto` may offer)")
    p.add_argument("--gate-variants", default="openvino-bf16,onnxruntime-int8,openvino-int8",
                   help="--precision-gate: the variants to judge (each only on a CPU that runs it natively: "
                        "serving/precision.py NATIVE_FLAGS)")
    p.add_argument("--gate-file", default=str(precision.DEFAULT_QUALITY_GATE),
                   help="default: the one `trident serve build --precision auto` reads, in the package's repository")
    p.add_argument("--gate-models", default=None,
                   help="--precision-gate: the models to judge, comma-separated (default: " + ", ".join(GATE_SETTINGS)
                        + "; the student where its checkpoint is there); the other checkpoints' verdicts stay")
    return p


def _check_args(args) -> None:
    if args.n < 10:
        raise ValueError(f"--n must be >= 10, got {args.n}")
    if not (args.truncation == 0 or args.truncation > 0 and args.model == "gan"):
        raise ValueError(f"--truncation applies to --model gan and must be > 0, got {args.truncation}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.guidance_t_min and (args.model not in DIFFUSION or args.sweep or args.precision_gate):
        raise ValueError("--guidance-t-min applies to one diffusion setting (--model diffusion or diffusion_student), "
                         "not to --sweep or --precision-gate")
    if args.guidance_t_min < 0:
        raise ValueError(f"--guidance-t-min must be >= 0, got {args.guidance_t_min}")
    if args.gate_models is not None and not args.precision_gate:
        raise ValueError("--gate-models applies to --precision-gate")
    gate_models = _gate_models(args)
    if gate_models == () or any(m not in GATE_SETTINGS for m in gate_models or ()):
        raise ValueError(f"--gate-models takes {', '.join(GATE_SETTINGS)}, got {args.gate_models!r}")
    if args.merge is not None:
        if not args.sweep:
            raise ValueError("--merge applies to --sweep")
        merge = _merge_models(args)
        if not merge or any(m not in MODELS for m in merge):
            raise ValueError(f"--merge takes {', '.join(MODELS)}, comma-separated, got {args.merge!r}")
    seeds = _seeds(args)
    if args.against is not None or args.seeds is not None:
        if args.sweep or args.precision_gate:
            raise ValueError("--seeds and --against measure one setting: not with --sweep or --precision-gate")
    if args.against is not None and (args.model not in DIFFUSION or args.against == args.model):
        raise ValueError(f"--against {args.against} compares two diffusion models: --model must be the other one, "
                         f"got --model {args.model}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds lists a seed twice: {args.seeds!r}")
    if args.variant and not (args.model in ("vae", "ae") and args.variant in ("prior", "fitted", "midpoints")
                             or args.model == "diffusion" and args.variant == "diffusers" and args.sampler == "ddim"):
        raise ValueError(f"--variant {args.variant!r} does not apply to --model {args.model} "
                         f"(--sampler {args.sampler})")


def _seeds(args) -> list[int]:
    if args.seeds is None:
        return [args.seed]
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(x < 0 for x in seeds):
        raise ValueError(f"--seeds takes comma-separated integers >= 0, got {args.seeds!r}")
    return seeds


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of model names, as --gate-models and --merge take it."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _merge_models(args) -> tuple[str, ...]:
    return _names(args.merge)


def _previous_report(out: Path, args, backend: str, checkpoints: dict[str, Path], merge: tuple[str, ...],
                     log) -> dict:
    """The report a --merge sweep keeps the other models' results from, checked to be comparable: the same n, seed,
    batch and backend, and (where the report records them) the same checkpoints for the models it keeps."""
    path = out / "quality.json"
    if not path.is_file():
        raise ValueError(f"--merge keeps the other results of {path}, which does not exist: run the full --sweep")
    report = json.loads(path.read_text())
    for key, want in (("n", args.n), ("seed", args.seed), ("batch", args.batch), ("backend", backend)):
        if report.get(key, 100 if key == "batch" else None) != want:  # reports before batch was recorded: 100
            raise ValueError(f"--merge: {path} was measured with {key} {report.get(key)!r}, this run's is {want!r}; "
                             "figures at another setting do not compare: run the full --sweep")
    recorded = report.get("checkpoints", {})
    for model in sorted({r["model"] for r in report["results"]} - set(merge)):
        if model not in recorded:
            log(f"warning: {path} does not record which {model} checkpoint it measured; keeping its results")
        elif checkpoints[model].is_file() and recorded[model] != file_sha256(checkpoints[model])[:12]:
            raise ValueError(f"--merge: {path} measured {model} at checkpoint {recorded[model]}, the current one is "
                             f"{file_sha256(checkpoints[model])[:12]}: add {model} to --merge")
    return report


def _gate_models(args) -> tuple[str, ...] | None:
    return None if args.gate_models is None else _names(args.gate_models)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
    except ValueError as e:
        print(f"trident evaluate: error: {e}", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.checkpoints)
    checkpoints = {m: root / m / "model.safetensors" for m in MODELS}
    classifier = Path(args.classifier) if args.classifier else root / "classifier" / "model.safetensors"
    if args.precision_gate:
        try:
            settings = gate_settings(checkpoints, _gate_models(args))
        except (ValueError, TridentError) as e:  # a named model without its checkpoint; a student's unreadable card
            print(f"trident evaluate: error: {e}", file=sys.stderr)
            return 2
        needed = [checkpoints[m] for m in settings]
    elif args.sweep:
        needed = [p for m, p in checkpoints.items() if m != "diffusion_student"]  # a student: if there
    else:
        needed = [checkpoints[args.model]] + ([checkpoints[args.against]] if args.against else [])
    for path in [classifier] + needed:
        if not path.is_file():
            print(f"trident evaluate: error: {path} not found", file=sys.stderr)
            return 2
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    net = FeatureNet(classifier)
    ref = RealReference.build(net, args.data_dir, cache_dir=Path(args.work) / "quality")
    if args.precision_gate:
        variants = tuple(v.strip() for v in args.gate_variants.split(",") if v.strip())
        cpu = precision.cpu_info()
        variants = tuple(v for v in variants if precision.not_native(v, cpu) is None)
        result = precision_gate({m: checkpoints[m] for m in settings}, Path(args.work), ref, args.n, args.seed,
                                args.batch, variants, Path(args.gate_file), log=log, settings=settings)
        print(json.dumps(result, indent=2))
        return 0
    clients = Clients(checkpoints, Path(args.work), args.url, args.protocol, log=log, precision=args.precision)
    try:
        if args.sweep:
            from trident.benchmarks.quality_report import write_report

            settings = sweep_settings(include_ddpm_1000=not args.no_ddpm_1000,
                                      student=checkpoints["diffusion_student"].is_file())
            backend = args.url or "onnxruntime (in-process)"
            merge = _merge_models(args) if args.merge else ()
            previous = None
            if merge:
                try:
                    previous = _previous_report(Path(args.out), args, backend, checkpoints, merge, log)
                except ValueError as e:
                    print(f"trident evaluate: error: {e}", file=sys.stderr)
                    return 2
                kept = {(r["model"], r["label"]): r for r in previous["results"] if r["model"] not in merge}
            results = []
            for i, s in enumerate(settings):
                cache = _cache_path(Path(args.work), s, args, checkpoints, net)
                if merge and s.model not in merge:
                    r = kept.get((s.model, s.label))
                    if r is None:
                        print(f"trident evaluate: error: --merge: {args.out}/quality.json has no result for "
                              f"{s.label} ({s.model}): merge with the options it was made with "
                              f"(`{previous.get('command', 'trident evaluate --sweep')}`), or run the full --sweep",
                              file=sys.stderr)
                        return 2
                    log(f"[{i + 1}/{len(settings)}] {s.label} (kept from the report): " + _summary(r))
                elif cache.is_file() and not args.fresh:
                    r = json.loads(cache.read_text())
                    log(f"[{i + 1}/{len(settings)}] {s.label} (cached: {cache}): " + _summary(r))
                else:
                    r = measure(clients, s, ref, args.n, args.seed, args.batch, progress=True)
                    with atomic_file(cache) as tmp:
                        tmp.write_text(json.dumps(r))
                    log(f"[{i + 1}/{len(settings)}] {s.label}: " + _summary(r))
                results.append(r)
            real = ref.real_scores(args.n, args.seed)
            command = "trident evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
            cpu = precision.cpu_info()
            machine = f"{cpu['model']}, {cpu['cores']} logical CPUs"
            measured = {m: file_sha256(checkpoints[m])[:12] for m in {s.model for s in settings}
                        if not merge or m in merge}
            report = {"n": args.n, "seed": args.seed, "batch": args.batch,
                      "classifier_test_accuracy": net.test_accuracy, "fd_floor": real["fd"], "real": real,
                      "backend": backend, "machine": machine, "results": results, "command": command,
                      "checkpoints": measured}
            if previous is not None:  # the header stays the full sweep's; the merge is named below it
                report.update(machine=previous["machine"], command=previous.get("command", "trident evaluate --sweep"),
                              checkpoints={**previous.get("checkpoints", {}), **measured},
                              merged=previous.get("merged", []) + [{
                                  "models": list(merge), "command": command, "machine": machine,
                                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}])
            picture = Path(args.out) / "quality_ae_vae.png"
            if not merge or {"vae", "ae"} & set(merge) or not picture.is_file():
                picture = ae_vae_picture(clients, ref, picture, args.seed)
            paths = write_report(report, Path(args.out), {"ae_vae": picture.name})
            print("\n".join(str(p) for p in paths))
            result = report
        else:
            diffusion = args.model in DIFFUSION
            default = default_sampling(args.model, checkpoints[args.model]) if diffusion else {}
            s = Setting(args.model, args.sampler or default.get("sampler", "") if diffusion else "",
                        args.steps or default.get("steps", 0) if diffusion else 0,
                        args.guidance if diffusion else 0.0,
                        args.variant or ("prior" if args.model in ("vae", "ae") else ""),
                        args.truncation if args.model == "gan" else 0.0, args.guidance_t_min)
            if args.seeds is None and args.against is None:
                result = measure(clients, s, ref, args.n, args.seed, args.batch, progress=True)
                result["fd_floor"] = ref.floor(args.n, args.seed)
            else:
                against = None
                if args.against:
                    other = default_sampling(args.against, checkpoints[args.against])
                    against = Setting(args.against, other["sampler"], other["steps"], args.guidance)
                result = across_seeds(clients, s, ref, args.n, _seeds(args), args.batch, against, log=log)
            result["classifier_test_accuracy"] = net.test_accuracy
            print(json.dumps(result, indent=2))
    finally:
        clients.close()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def default_sampling(model: str, checkpoint: Path) -> dict:
    """The sampler and steps a diffusion model draws with by default (sampling.default_settings): a step-distilled
    student's card names its steps."""
    if model != "diffusion_student":
        return sampling.default_settings()
    from trident.training.checkpoint import card_of, read_meta

    return sampling.default_settings(card_of(read_meta(checkpoint), checkpoint).distilled_steps)


def _cache_path(work: Path, s: Setting, args, checkpoints: dict[str, Path], net: FeatureNet) -> Path:
    """Where a sweep keeps one setting's result: keyed by everything that decides it (the setting, n, seed, batch,
    backend, the model's and the classifier's bytes, and the sampler code for diffusion), so a re-run after a new
    GAN checkpoint re-measures the GAN alone."""
    # fields added later are left out at their default: the cache keys made before them stay valid
    setting = {k: v for k, v in asdict(s).items() if not (k in ("truncation", "guidance_t_min") and not v)}
    key = {"setting": setting, "n": args.n, "seed": args.seed, "batch": args.batch, "url": args.url,
           "model": file_sha256(checkpoints[s.model]), "classifier": net.digest,
           "code": file_sha256(Path(sampling.__file__)) if s.model in DIFFUSION else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return work / "quality" / f"result-{s.model}-{digest}.json"


def _summary(r: dict) -> str:
    agree = f"agreement {r['agreement']:.3f}, " if "agreement" in r else ""
    return (f"{agree}FD {r['fd']:.1f}, precision {r['precision']:.3f}, recall {r['recall']:.3f}, diversity "
            f"{r['diversity']:.2f}, sharpness {r['sharpness']:.2f}, brightness {r['brightness']:.1f} "
            f"({r['draw_seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
