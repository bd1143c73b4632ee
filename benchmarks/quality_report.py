"""The image-quality report of `trident evaluate --sweep`: quality.md, quality.json and plots, from the sweep's results
(benchmarks/evaluate.py draws and measures; this module only formats and plots)."""
from __future__ import annotations

import json
from pathlib import Path

from trident.serving.files import atomic_file

from trident.benchmarks.evaluate import GAN_TARGETS

from .charts import lines, save_panels, scatter

GUIDANCE_STEPS = 20   # the guidance sweep's step count
STEPS_GUIDANCE = 3.0  # the step sweep's guidance
COLUMNS = ("nfe", "agreement", "fd", "precision", "recall", "diversity", "sharpness", "brightness")
# Issue 19's targets, judged on the sweep's results (n = 1000): the teacher at DPM-Solver++-20, the student at its
# distilled 4 steps against the teacher at the same guidance
TEACHER_TARGETS = {"unguided_fd": 20.0, "best_fd": 18.0, "g3_agreement": 0.99}
STUDENT_TARGETS = {"steps": 4, "fd_ratio": 1.1, "agreement_drop": 0.01, "guidance": (1.5, 3.0)}


FIELD_DEFAULTS = {"truncation": 0.0, "guidance_t_min": 0}  # Setting fields that results made before them lack


def _find(results, **match):
    for r in results:
        if all(r.get(k, FIELD_DEFAULTS.get(k)) == v for k, v in match.items()):
            return r
    return None


def _real_agreement(report) -> str:
    real = (report.get("real") or {}).get("agreement")
    return f"{real:.1%}" if real is not None else "n/a"


def _cell(r: dict, col: str) -> str:
    v = r.get(col)
    if v is None:
        return "–"
    if col == "agreement":
        return f"{100 * v:.1f}%"
    if col == "nfe":
        return str(v)
    if col in ("fd", "brightness"):
        return f"{v:.1f}"
    return f"{v:.3f}" if col in ("precision", "recall") else f"{v:.2f}"


def _table(rows: list[dict], columns=COLUMNS) -> list[str]:
    out = ["| setting | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    out += [f"| {r['label']} | " + " | ".join(_cell(r, c) for c in columns) + " |" for r in rows]
    return out


def _in_steps_sweep(r: dict) -> bool:
    return (r["model"] == "diffusion" and r["guidance"] == STEPS_GUIDANCE and not r["variant"]
            and not r.get("guidance_t_min"))


def _in_guidance_sweep(r: dict) -> bool:
    return (r["model"] == "diffusion" and r["steps"] == GUIDANCE_STEPS and not r["variant"]
            and not r.get("guidance_t_min"))


def _sampler_grid(samplers, columns, header, lookup, cell) -> list[str]:
    """A markdown table with one row per sampler and one column per value (steps or guidance): cell(result), or a
    dash where the sweep has no result."""
    out = ["| sampler | " + " | ".join(header(c) for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for sampler in samplers:
        cells = [cell(r) if (r := lookup(sampler, c)) else "–" for c in columns]
        out.append(f"| {sampler} | " + " | ".join(cells) + " |")
    return out


def diffusion(results, sampler, steps, guidance, variant="", guidance_t_min=0):
    return _find(results, model="diffusion", sampler=sampler, steps=steps, guidance=guidance, variant=variant,
                 guidance_t_min=guidance_t_min)


def student(results, steps, guidance, guidance_t_min=0):
    return _find(results, model="diffusion_student", steps=steps, guidance=guidance, guidance_t_min=guidance_t_min)


def interval_students(results, guidance, steps=None) -> list[dict]:
    """The student's results at this guidance drawn with guidance_t_min (at these steps, or any)."""
    return [r for r in results if r["model"] == "diffusion_student" and r["guidance"] == guidance
            and r.get("guidance_t_min") and steps in (None, r["steps"])]


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def ratio_text(ratio: float, bound: float) -> str:
    """A ratio judged against a bound, to 2 decimals, or to as many more (up to 4) as it takes not to print the
    bound itself for a ratio on the other side of it (1.1006 against 1.1 reads 1.101x, not 1.10x)."""
    for digits in (2, 3, 4):
        text = f"{ratio:.{digits}f}"
        if ratio == bound or float(text) != bound:
            break
    return text + "x"


def distillation_section(res: list[dict]) -> list[str]:
    """The teacher's targets and the student against it at equal guidance (issue 19), or [] without a student."""
    studs = [r for r in res if r["model"] == "diffusion_student"]
    if not studs:
        return []
    md = ["## The distilled student against its teacher", "",
          "The student (`diffusion_student`: guidance scale as an input, one row per image per step, DDIM on the "
          "trailing grid it was distilled on) against the teacher's DPM-Solver++-20 with guidance (40 rows per "
          "image) at the same guidance; ratio = student FD / teacher FD, drop = teacher agreement - student's.", ""]
    steps = sorted({r["steps"] for r in studs})
    for g in sorted({r["guidance"] for r in studs}):
        teacher = diffusion(res, "dpmpp-2m", 20, g)
        if not teacher:
            continue
        md += [f"Guidance {g:g}: teacher FD {teacher['fd']:.1f}, agreement {100 * teacher['agreement']:.1f}%, "
               f"recall {teacher['recall']:.3f}.", "",
               "| student steps | nfe | FD | ratio | agreement | drop | recall |", "|---:|---:|---:|---:|---:|---:|---:|"]
        rows = [(str(n), r) for n in steps if (r := student(res, n, g))]
        rows += [(f"{r['steps']}, guidance at t >= {r['guidance_t_min']}", r)
                 for r in interval_students(studs, g)]
        for name, r in rows:
            md.append(f"| {name} | {r['nfe']} | {r['fd']:.1f} | {r['fd'] / teacher['fd']:.2f}x | "
                      f"{100 * r['agreement']:.1f}% | {100 * (teacher['agreement'] - r['agreement']):+.1f} pt | "
                      f"{r['recall']:.3f} |")
        md.append("")
    md += ["| target | measured | |", "|---|---:|---|"]
    unguided = diffusion(res, "dpmpp-2m", 20, 1.0)
    grid = sorted((r for r in res if _in_guidance_sweep(r) and r["sampler"] == "dpmpp-2m"), key=lambda r: r["guidance"])
    g3 = diffusion(res, "dpmpp-2m", 20, 3.0)
    if unguided:
        md.append(f"| teacher: unguided DPM-Solver++-20 FD <= {TEACHER_TARGETS['unguided_fd']:g} | "
                  f"{unguided['fd']:.1f} | {_verdict(unguided['fd'] <= TEACHER_TARGETS['unguided_fd'])} |")
    if grid:
        best = min(grid, key=lambda r: r["fd"])
        scales = ", ".join(f"{r['guidance']:g}" for r in grid)
        md.append(f"| teacher: best DPM-Solver++-20 FD over guidance {scales} "
                  f"<= {TEACHER_TARGETS['best_fd']:g} | {best['fd']:.1f} (g {best['guidance']:g}) | "
                  f"{_verdict(best['fd'] <= TEACHER_TARGETS['best_fd'])} |")
    if g3:
        md.append(f"| teacher: DPM-Solver++-20 guidance 3 agreement >= {100 * TEACHER_TARGETS['g3_agreement']:.0f}% | "
                  f"{100 * g3['agreement']:.1f}% | {_verdict(g3['agreement'] >= TEACHER_TARGETS['g3_agreement'])} |")
    n = STUDENT_TARGETS["steps"]
    for g in STUDENT_TARGETS["guidance"]:
        t = diffusion(res, "dpmpp-2m", 20, g)
        for r in [student(res, n, g)] + interval_students(studs, g, n):
            if not (r and t):
                continue
            ratio, bound = r["fd"] / t["fd"], STUDENT_TARGETS["fd_ratio"]
            interval = f" (guidance at t >= {r['guidance_t_min']} only)" if r.get("guidance_t_min") else ""
            md.append(f"| student, {n} steps, guidance {g:g}{interval}: FD <= {bound:g}x the teacher's "
                      f"({t['fd']:.1f}) | {r['fd']:.1f} = {ratio_text(ratio, bound)} | {_verdict(ratio <= bound)} |")
    r, t = student(res, n, 3.0), g3
    if r and t:
        drop = t["agreement"] - r["agreement"]
        md.append(f"| student, {n} steps, guidance 3: agreement within {100 * STUDENT_TARGETS['agreement_drop']:.0f} "
                  f"point of the teacher's ({100 * t['agreement']:.1f}%) | {100 * r['agreement']:.1f}% | "
                  f"{_verdict(drop <= STUDENT_TARGETS['agreement_drop'] + 1e-9)} |")
    return md + [""]


def gan_verdict(results, truncation: float = 0.0) -> tuple[dict | None, dict | None, dict | None]:
    from trident.benchmarks.evaluate import check_gan_targets

    gan = _find(results, model="gan", truncation=truncation)
    unguided = diffusion(results, "dpmpp-2m", 20, 1.0)
    return gan, unguided, (check_gan_targets(gan, unguided) if gan and unguided else None)


def render_markdown(report: dict, pictures: dict[str, str]) -> str:
    res = report["results"]
    n = report["n"]
    samplers = list(dict.fromkeys(r["sampler"] for r in res if r["model"] == "diffusion"))
    md = ["# Image quality", "",
          f"Made by `{report.get('command', 'trident evaluate --sweep')}` on the shipped checkpoints: n = {n} images "
          f"per setting (seed {report['seed']}, classes in equal shares), drawn through {report['backend']} on "
          f"{report['machine']}, judged by the project's classifier (test accuracy "
          f"{report['classifier_test_accuracy']:.2%}) against the 10,000 real test images.", "",
          *[f"- Merged in later (`{m['command']}`, {m['date']} on {m['machine']}): every `{'`, `'.join(m['models'])}` "
            "setting re-measured; the rest of the report is the run described above." for m in report.get("merged", [])],
          *([""] if report.get("merged") else []),
          "- **agreement**: share of images the classifier assigns to the requested class (conditional models).",
          "- **fd**: Frechet distance in the classifier's 256-d penultimate features against the real test set; lower "
          f"is better. FD grows as n shrinks: compare at equal n. Floor at n = {n} (real training images vs the test "
          f"set): **{report['fd_floor']:.1f}**.",
          "- **precision / recall**: k-NN manifolds (Kynkaanniemi et al. 2019, k = 3) against n real test images: "
          "fidelity and variety as separate numbers.",
          "- **diversity**: mean pairwise feature distance within a class, as a ratio to real images (1 = as varied "
          "as real data). **sharpness**: Laplacian variance as a ratio to real images. **brightness**: mean pixel "
          f"0-255 (real: {res[0]['real_brightness']:.1f}).",
          "- **nfe**: network evaluations per image (guidance sends 2 rows a step, in one request).", "",
          "## Headline", ""]
    head = [diffusion(res, "dpmpp-2m", 20, 3.0), diffusion(res, "ddim", 20, 3.0), diffusion(res, "ddpm", 50, 3.0),
            diffusion(res, "ddpm", 1000, 3.0), diffusion(res, "dpmpp-2m", 20, 1.0),
            student(res, STUDENT_TARGETS["steps"], 3.0), student(res, 2 * STUDENT_TARGETS["steps"], 3.0),
            _find(res, model="gan", truncation=0.0), _find(res, model="gan", truncation=1.0),
            _find(res, model="vae", variant="prior"), _find(res, model="ae", variant="prior")]
    md += _table([r for r in head if r]) + [""]

    md += [f"## Diffusion: steps at guidance {STEPS_GUIDANCE:g}", "", "FD (agreement, brightness) per sampler and "
           "step count:", ""]
    step_counts = sorted({r["steps"] for r in res if _in_steps_sweep(r)})
    md += _sampler_grid(samplers, step_counts, lambda s: f"{s} steps",
                        lambda sampler, steps: diffusion(res, sampler, steps, STEPS_GUIDANCE),
                        lambda r: f"{r['fd']:.1f} ({100 * r['agreement']:.0f}%, {r['brightness']:.0f})")
    md += ["", f"![FD vs NFE]({pictures['sampling']})", ""]

    md += [f"## Diffusion: guidance at {GUIDANCE_STEPS} steps", "", "FD / agreement / recall per sampler and guidance "
           "scale (guidance 1 = conditional, unguided):", ""]
    scales = sorted({r["guidance"] for r in res if _in_guidance_sweep(r)})
    md += _sampler_grid(samplers, scales, lambda g: f"g {g:g}",
                        lambda sampler, g: diffusion(res, sampler, GUIDANCE_STEPS, g),
                        lambda r: f"{r['fd']:.1f} / {100 * r['agreement']:.0f}% / {r['recall']:.2f}")
    md += ["", f"![FD and agreement vs guidance]({pictures['guidance']})", ""]

    md += distillation_section(res)

    ddim_rows = [r for s in (20, 50) for r in (diffusion(res, "ddim", s, 3.0, "diffusers"),
                                              diffusion(res, "ddim", s, 3.0), diffusion(res, "dpmpp-2m", s, 3.0))
                 if r]
    if ddim_rows:
        md += ["## DDIM with guidance: before and after the fix", "",
               "\"diffusers DDIM\" is DDIM as diffusers' DDIMScheduler runs it by default (`use_clipped_model_output="
               "False`): x_0 is clipped but the step keeps the model's guided, unclipped eps. trident's DDIM "
               "re-derives eps from the clipped x_0 (guided-diffusion's `_predict_eps_from_xstart`), the default in "
               "the client loop, the server-side loop and every backend. DPM-Solver++ at equal steps beside them:", ""]
        md += _table(ddim_rows) + [""]

    truncations = sorted({r.get("truncation", 0.0) for r in res if r["model"] == "gan"})
    verdicts = {t: gan_verdict(res, t) for t in truncations}
    verdicts = {t: v for t, v in verdicts.items() if v[2]}
    if verdicts:
        md += ["## GAN targets", "", "Real training images score "
               f"{_real_agreement(report)} class agreement with this classifier (it is "
               f"{report['classifier_test_accuracy']:.1%} accurate), so the agreement target asks for more class-typical images than real data; truncation "
               "(the SDK's `generate(..., truncation=T)`, z clipped to [-T, T]) trades variety for that.", "",
               "| target | " + " | ".join(f"`{v[0]['label']}`" for v in verdicts.values()) + " |",
               "|---|" + "---:|" * len(verdicts)]
        unguided = next(iter(verdicts.values()))[1]
        rows = [("agreement", f"class agreement >= {100 * GAN_TARGETS['agreement']:.0f}%",
                 lambda v, g: f"{100 * v[0]:.1f}%"),
                ("diversity", f"within-class diversity >= {GAN_TARGETS['diversity']:.2f} of real data",
                 lambda v, g: f"{v[0]:.2f}"),
                ("fd_vs_unguided_diffusion", f"FD <= {GAN_TARGETS['fd_vs_unguided_diffusion']:g}x unguided "
                 f"DPM-Solver++-20 ({unguided['fd']:.1f})",
                 lambda v, g: f"{g['fd']:.1f} = {ratio_text(v[0], GAN_TARGETS['fd_vs_unguided_diffusion'])}")]
        for key, text, fmt in rows:
            md.append(f"| {text} | " + " | ".join(
                f"{fmt(v[2][key], v[0])} {'pass' if v[2][key][1] else 'FAIL'}" for v in verdicts.values()) + " |")
        md.append("")

    latent = [r for r in (_find(res, model="vae", variant="prior"), _find(res, model="ae", variant="prior"),
                          _find(res, model="ae", variant="fitted"), _find(res, model="vae", variant="midpoints"),
                          _find(res, model="ae", variant="midpoints")) if r]
    if latent:
        md += ["## Why the VAE exists: the autoencoder next to it", "",
               "The same encoder and decoder trained twice: as a VAE (reconstruction + KL to N(0, I)) and as a plain "
               "autoencoder (reconstruction only). *prior*: decode z ~ N(0, I); *fitted*: decode z from a Gaussian "
               "fitted to the autoencoder's codes of 10,000 training images (the best an AE can do without a prior); "
               "*midpoints*: decode the mean of the codes of two random real test images. Agreement does not apply "
               "(unconditional); diversity is by predicted class.", ""]
        md += _table(latent, ("fd", "precision", "recall", "diversity", "sharpness", "brightness")) + [""]
        if "ae_vae" in pictures:
            md += [f"![VAE vs AE]({pictures['ae_vae']})", "",
                   "Rows: VAE samples z ~ N(0, I); AE samples z ~ N(0, I); then, for three pairs of real test images, "
                   "the VAE's and the AE's decoded straight line between the two images' codes.", ""]

    md += ["## Precision and recall of every model", "", f"![precision-recall]({pictures['pr']})", "",
           "## All settings", ""]
    real = report.get("real") or {"fd": report["fd_floor"]}
    md += _table(res + [{**real, "label": f"real training images (n = {n}; the floor)", "nfe": None}]) + [""]
    md += [f"Draw time per setting (n = {n}, seconds): " +
           ", ".join(f"{r['label']} {r['draw_seconds']:.0f}" for r in res), ""]
    return "\n".join(md)


def plots(report: dict, out: Path) -> dict[str, str]:
    res = report["results"]
    floor = ("real-data floor", report["fd_floor"])
    samplers = list(dict.fromkeys(r["sampler"] for r in res if r["model"] == "diffusion"))
    steps_series = {s: [(r["nfe"], r["fd"]) for r in res if _in_steps_sweep(r) and r["sampler"] == s]
                    for s in samplers}
    guid = {s: [r for r in res if _in_guidance_sweep(r) and r["sampler"] == s] for s in samplers}
    made = {}
    for name, panels in {
        "sampling": [lines(f"FD vs network evaluations (guidance {STEPS_GUIDANCE:g}, n={report['n']})",
                           steps_series, "NFE per image (log)", "FD", logx=True, hline=floor)],
        "guidance": [lines(f"FD vs guidance ({GUIDANCE_STEPS} steps)", {s: [(r["guidance"], r["fd"]) for r in rs]
                                                                         for s, rs in guid.items()},
                           "guidance scale", "FD", hline=floor),
                     lines(f"Class agreement vs guidance ({GUIDANCE_STEPS} steps)",
                           {s: [(r["guidance"], 100 * r["agreement"]) for r in rs] for s, rs in guid.items()},
                           "guidance scale", "agreement %")],
        "pr": [scatter("Precision vs recall", _pr_points(res), "recall", "precision")],
    }.items():
        path = save_panels(out / f"quality_{name}.png", panels)
        if path is not None:
            made[name] = path.name
    return made


def _pr_points(res) -> list[tuple[str, float, float]]:
    keep = [diffusion(res, "dpmpp-2m", 20, 3.0), diffusion(res, "dpmpp-2m", 20, 1.0), diffusion(res, "ddim", 20, 3.0),
            diffusion(res, "ddim", 20, 3.0, "diffusers"), diffusion(res, "ddpm", 50, 3.0),
            diffusion(res, "dpmpp-2m", 20, 5.0), _find(res, model="gan", truncation=0.0),
            _find(res, model="gan", truncation=1.0), _find(res, model="vae", variant="prior"),
            _find(res, model="ae", variant="prior"), _find(res, model="ae", variant="fitted")]
    return [(r["label"], r["recall"], r["precision"]) for r in keep if r]


def write_report(report: dict, out: Path, extra_pictures: dict[str, str] | None = None) -> list[Path]:
    """Write quality.json, the plots and quality.md into out; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pictures = {**plots(report, out), **(extra_pictures or {})}
    written = [out / f"quality_{name}.png" for name in pictures if (out / f"quality_{name}.png").is_file()]
    for name, text in (("quality.json", json.dumps(report, indent=1) + "\n"),
                       ("quality.md", render_markdown(report, pictures))):
        with atomic_file(out / name) as tmp:
            tmp.write_text(text)
        written.append(out / name)
    return written
