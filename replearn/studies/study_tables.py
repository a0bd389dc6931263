"""The seed papers' study tables (wgan_grid.py, ablation.py, augment.py): one row per study cell over its
seeds, each row self-describing, gains against one reference with noise marks, and the seed paper's own
numbers from docs/quoted.json, written as markdown, CSV, LaTeX and study.json.

- **Seeds.** A number is the mean over seeds +- their standard deviation (ddof=1; "(1 seed)" when there is
  one); the CSV keeps every seed's value (`<measure>_seed<k>`).
- **Noise marks.** A gain is marked `*` when its size exceeds the larger of two 95% half-widths and `(n.s.)`
  when it does not. The seeds' half-width: Student t (min(n, n_ref) - 1 degrees of freedom) times
  sqrt(s^2/n + s_ref^2/n_ref), s the std over seeds; for a gain over the row's own untrained control, the
  per-seed differences' t half-width (paired: the same run). The test split's: the binomial half-width of
  the row's accuracy on its N test images (`noise.test_ci95`). The +- after a gain is the one used and the
  CSV names it (`*_noise_from`); with one seed only the test term is known.
- **Every row says** its scale (the preset, or `custom (...)` naming where it departs), the commits of its
  artifacts, its data, the steps each GAN trained, its seeds, and its flags (time cap, divergence, C at the
  edge of the SVM's grid, unconverged fits, mixed or dirty commits).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..core.config import PRESETS, to_dict
from ..publish.formats import duration, latex_escape, split_name
from ..publish.noise import test_ci95
from ..core.utils import atomic_write_json, atomic_write_text, git_commit, provenance

QUOTED_JSON = Path(__file__).resolve().parents[2] / "docs" / "quoted.json"


# ============================================================================ numbers over seeds
def finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def stats(values: list) -> dict[str, Any]:
    """Mean and std (ddof=1) of the finite values; `values` as given (one per seed, None where missing)."""
    got = finite(values)
    return {"mean": float(np.mean(got)) if got else None, "std": float(np.std(got, ddof=1)) if len(got) > 1 else None,
            "n": len(got), "values": list(values)}


def spread_text(st: dict, spec: str = ".3g", scale: float = 1.0) -> str:
    """'0.131 ± 0.02' (mean ± std over seeds), '0.131 (1 seed)', or 'n/a'."""
    if not st["n"]:
        return "n/a"
    text = format(scale * st["mean"], spec)
    return text + (f" ± {format(scale * st['std'], spec)}" if st["std"] is not None else " (1 seed)")


def per_seed(name: str, seeds: list[int], values: list) -> dict[str, Any]:
    return {f"{name}_seed{s}": v for s, v in zip(seeds, values)}


def stat_columns(name: str, st: dict, seeds: list[int]) -> dict[str, Any]:
    return {f"{name}_mean": st["mean"], f"{name}_std": st["std"], **per_seed(name, seeds, st["values"])}


# ============================================================================ noise marks
def t95(df: int) -> float:
    from scipy.stats import t
    return float(t.ppf(0.975, df))


def seed_half_width(a: dict, b: dict) -> float | None:
    """95% half-width of mean(a) - mean(b) from the seeds (unpaired; None unless both have 2+ seeds)."""
    if a["std"] is None or b["std"] is None:
        return None
    return t95(min(a["n"], b["n"]) - 1) * math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])


def paired_half_width(diffs: list[float]) -> float | None:
    d = finite(diffs)
    return t95(len(d) - 1) * float(np.std(d, ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else None


def marked(gain: float | None, seed_hw: float | None, test_hw: float | None) -> dict[str, Any]:
    """{gain, noise, noise_from, beyond_noise}: the larger known half-width decides the mark."""
    if gain is None:
        return {}
    known = {k: v for k, v in (("seeds", seed_hw), ("test", test_hw)) if v is not None}
    if not known:
        return {"gain": gain, "noise": None, "noise_from": None, "beyond_noise": None}
    source = max(known, key=known.get)
    return {"gain": gain, "noise": known[source], "noise_from": source, "beyond_noise": abs(gain) > known[source]}


def gain_text(g: dict, scale: float = 100.0) -> str:
    if not g:
        return "-"
    text = f"{scale * g['gain'] + 0.0:+.1f}".replace("-0.0", "+0.0")
    if g.get("noise") is not None:
        text += f" ± {scale * g['noise']:.1f}" + (" *" if g["beyond_noise"] else " (n.s.)")
    return text


def gain_columns(name: str, g: dict) -> dict[str, Any]:
    return {name: g.get("gain"), f"{name}_noise": g.get("noise"), f"{name}_noise_from": g.get("noise_from"),
            f"{name}_beyond_noise": g.get("beyond_noise")}


def noise_note(reference: str, column: str, own_control: bool = True) -> str:
    """The header's words for the gain columns and their marks."""
    own = ("; \"gain over own control\" compares each row with the same runs' untrained critics (step 0), seed by "
           "seed" if own_control else "")
    paired = (", or for the own-control gain t times the std of the per-seed differences over sqrt(n)"
              if own_control else "")
    return (f"Gains are in accuracy points. \"{column}\" compares each row's mean with the reference row "
            f"({reference}){own}. A gain is marked * when its size exceeds the larger of two 95% half-widths, "
            "(n.s.) when it does not; the ± after it is the one used: (1) the seeds': Student t with min(n, n_ref) - 1 "
            f"degrees of freedom times sqrt(s²/n + s_ref²/n_ref), s the std over seeds (ddof=1){paired}; (2) the test "
            "split's own sampling error: the binomial half-width 1.96 sqrt(p(1-p)/N) at the row's accuracy p on its N "
            "test images (column \"test ±\"). The csv names which was larger (*_noise_from); with one seed only (2) "
            "is known.")


# ============================================================================ what every row says
def scale_label(cfg, stage: str) -> str:
    """The preset's name when every key it sets has that value, else 'custom (<preset> preset, key=value ...)'."""
    wanted = PRESETS.get(cfg.preset, {}).get(stage, {})
    off = [k for k, v in wanted.items() if hasattr(cfg, k) and getattr(cfg, k) != (tuple(v) if isinstance(v, list) else v)]
    return cfg.preset if not off else f"custom ({cfg.preset} preset; {', '.join(setting(cfg, k) for k in off)})"


def setting(cfg, key: str) -> str:
    """'key=value', the value shortened to its first words when long (study.json has it whole)."""
    value = getattr(cfg, key)
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return f"{key}={text if len(text) <= 24 else text[:21] + '...'}"


def commits(*records: dict | None) -> list[str]:
    """The distinct git commits in these artifacts' provenance."""
    found = {str((r.get("provenance") or {}).get("git_commit")) for r in records if r}
    return sorted(c for c in found if c not in ("None", "?", ""))


def commit_flags(found: list[str]) -> list[str]:
    out = ["artifacts from different commits"] if len(found) > 1 else []
    return out + (["built from a dirty tree"] if any(c.endswith("-dirty") for c in found) else [])


def probe_flags(seed: int, end: dict) -> list[str]:
    out = []
    for what, point, details in (("probe", end.get("probe"), end.get("probe_details") or {}),
                                 ("control", end.get("control"), end.get("control_details") or {})):
        if point and point.get("c_at_edge"):
            out.append(f"seed {seed} {what}: best C at the edge of the capped grid")
        if details.get("not_converged"):
            out.append(f"seed {seed} {what}: {details['not_converged']} of {details.get('fits')} SVM fits did not "
                       "converge")
    return out


def steps_text(cells: list) -> str:
    """'200' when every GAN was measured at the study's steps, else the step each seed was measured at."""
    target = cells[0].target
    if all(c.end_step == target for c in cells):
        return str(target)
    return f"{target} wanted; measured at " + ", ".join(f"seed {c.seed}: {c.end_step}" for c in cells)


def status_text(cells: list) -> str:
    problems = [p for c in cells for p in c.problems()]
    return "comparable" if not problems else "NOT COMPARABLE: " + "; ".join(problems)


def gan_columns(cfg, stage: str, sc) -> dict[str, str]:
    """scale, steps, seeds, status, flags, data and commit of a GAN study's row."""
    found = commits(*(c.end for c in sc.cells), *(m.get("probe") for m in sc.measured))
    flags = [f for c, m in zip(sc.cells, sc.measured) for f in probe_flags(c.seed, m["end"])] + commit_flags(found)
    data = (f"GANs on {split_name(cfg.data)}; probe fit on {split_name(cfg.train)}, scored on {split_name(cfg.test)}"
            + (f"; {cfg.data_note}" if cfg.data_note else ""))
    return {"scale": scale_label(cfg, stage), "steps": steps_text(sc.cells),
            "seeds": ",".join(str(c.seed) for c in sc.cells), "status": status_text(sc.cells),
            "flags": "; ".join(flags) or "none", "data": data, "commit": ", ".join(found) or "?"}


# ============================================================================ the GAN studies' measures
def measure_column(sc, name: str, spec: str = ".3g") -> tuple[str, dict]:
    st = stats(sc.ends(name))
    return spread_text(st, spec), stat_columns(name, st, [c.seed for c in sc.cells])


def probe_stats(sc) -> tuple[dict, dict, int | None]:
    """(probe accuracy over seeds, control accuracy over seeds, the probe's test size)."""
    acc = stats([p["mean"] if p else None for p in sc.ends("probe")])
    ctl = stats([p["mean"] if p else None for p in sc.ends("control")])
    sizes = [d.get("test_size") for d in sc.ends("probe_details") if d and d.get("test_size")]
    return acc, ctl, (sizes[0] if sizes else None)


def probe_columns(sc, ref, ref_name: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The probe, its test noise, the gain vs the study's reference row, the untrained control and the gain
    over it (display, numeric)."""
    seeds = [c.seed for c in sc.cells]
    acc, ctl, n_test = probe_stats(sc)
    test_hw = test_ci95(acc["mean"], n_test)
    if ref is None:
        vs_ref: dict = {}
    elif ref is sc:
        vs_ref = {"reference": True}
    else:
        ref_acc = probe_stats(ref)[0]
        vs_ref = marked(None if acc["mean"] is None or ref_acc["mean"] is None else acc["mean"] - ref_acc["mean"],
                        seed_half_width(acc, ref_acc), test_hw)
    diffs = [a - b for a, b in zip(acc["values"], ctl["values"]) if a is not None and b is not None]
    own = marked(float(np.mean(diffs)) if diffs else None, paired_half_width(diffs), test_hw)
    display = {"linear probe (%)": spread_text(acc, ".1f", 100),
               "test ±": f"± {100 * test_hw:.1f} (N={n_test})" if test_hw is not None else "-",
               f"gain vs {ref_name}": "reference" if vs_ref.get("reference") else gain_text(vs_ref),
               "untrained control (%)": spread_text(ctl, ".1f", 100), "gain over own control": gain_text(own)}
    numeric = {**stat_columns("probe", acc, seeds), "probe_test_size": n_test, "probe_test_ci95": test_hw,
               **stat_columns("control", ctl, seeds), **gain_columns("gain_vs_reference", vs_ref),
               "is_reference": bool(vs_ref.get("reference")), **gain_columns("gain_over_control", own)}
    return display, numeric


def wasserstein_column(sc) -> tuple[str, dict]:
    """The Wasserstein estimate of WGAN critics; a BCE/hinge critic's value is labelled its logit gap."""
    from .study import is_wasserstein_critic
    text, numeric = measure_column(sc, "wasserstein")
    return (text if is_wasserstein_critic(sc.first) or text == "n/a" else f"{text} (logit gap: not a W estimate)"), numeric


def how_produced(cfg, sc) -> str:
    """Nets, optimiser, data, each seed's run, steps, time and hardware, the quality and probe settings."""
    first = sc.first.end
    run_cfg, info = first.get("config") or {}, first.get("data") or {}
    text = (f"{run_cfg.get('arch')} G/D, loss {run_cfg.get('loss')}, {run_cfg.get('optimizer')} lr "
            f"{run_cfg.get('lr_d')}/{run_cfg.get('lr_g')} (D/G), batch {run_cfg.get('batch_size')}, n_critic "
            f"{run_cfg.get('n_critic')}, width {run_cfg.get('width')}; trained on {split_name(info.get('spec', '?'))} "
            f"({info.get('num_images', '?')} images, labels unused), {run_cfg.get('steps')} G steps wanted "
            f"(cap {run_cfg.get('max_minutes') or 'none'} min); per seed: ")
    seeds = []
    for cell in sc.cells:
        state = cell.end
        prov = state.get("provenance") or {}
        seeds.append(f"seed {cell.seed} run {Path(cell.run_dir).name} at {cell.end_name}: {state.get('step')} G steps, "
                     f"{state.get('batches')} critic batches, {state.get('precision')}, "
                     f"{duration(state.get('seconds') or 0)} on {prov.get('hardware', '?')}")
    text += "; ".join(seeds)
    text += (f"; quality: {cfg.quality_samples} generated vs held-out {split_name(cfg.test)}"
             + (f", FID on {cfg.fid_samples}" if cfg.inception_weights else ""))
    probed = sc.measured[0].get("probe")
    if probed:
        pc = probed.get("config") or {}
        text += (f"; probe: {pc.get('per_class')} per class, {pc.get('final_draws')} draws, C bracketed on "
                 f"{pc.get('val_size')} held out, features of {pc.get('train_rows') or 'all'} rows of "
                 f"{split_name(cfg.train)}, scored on {pc.get('test_rows') or 'all'} rows of {split_name(cfg.test)}")
    return text


QUALITY_NOTE = ("Columns: measured at each GAN's checkpoint of the study's step count (\"steps\"); every number is "
                "the mean ± std over the row's seeds. Wasserstein estimate: E[D(real)] - E[D(fake)] of the critic on "
                "held-out real images; for a BCE critic (DCGAN) the same difference is a logit gap, labelled so, and "
                "not comparable with the WGAN rows. Diversity: mean per-dimension variance of generated images in "
                "the features of a fixed random-weight DCGAN critic (seed 0, width 0.5, every layer globally "
                "max-pooled, 896 dims), divided by the same for held-out real images (1 = as varied as real images, "
                "~0 = collapse). Critic and generator losses: mean over the last tenth of the logged training steps. "
                "Linear probe: 400-per-class L2-SVM accuracy of the critic's 4x4-pooled features (each seed's "
                "value the mean over the SVM's draws). Untrained control: the same runs' critics at step 0. status: "
                "\"comparable\" when every seed trained the study's steps; flags: C at the edge of the SVM's grid, "
                "unconverged SVM fits, mixed or dirty commits.")


# ============================================================================ the seed papers' numbers
def flat(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {flat(v)}" for k, v in value.items())
    return str(value)


def quoted_rows(study: str, path: Path = QUOTED_JSON) -> list[dict[str, Any]]:
    """The seed paper's numbers for this study (docs/quoted.json), one row per value, with their setting."""
    if not path.is_file():
        return [{"kind": "quoted", "quoted item": "-", "value": f"{path} not found", "scale": "quoted"}]
    rows = []
    for entry in (e for e in json.loads(path.read_text())["entries"] if e["study"] == study):
        paper, setting = entry["paper"], dict(entry.get("setting") or {})
        data = setting.pop("data", "not stated")
        source = (f"seed {paper['seed']}: {paper['authors']}, {paper.get('year') or 'no year given'}, "
                  f"{entry.get('where', '')}")
        for item, value in (entry.get("values") or {"-": "no numbers (figures only)"}).items():
            rows.append({"kind": "quoted", "quoted item": item, "value": flat(value), "metric": entry["metric"],
                         "quoted kind": entry["kind"], "scale": "quoted", "data": data,
                         "setting": "; ".join(f"{k}: {v}" for k, v in setting.items()) or "-", "source": source,
                         "note": entry.get("note", "")})
    return rows


QUOTED_COLUMNS = ["quoted item", "value", "metric", "quoted kind", "scale", "data", "setting", "source", "note"]


# ============================================================================ writers
def md_table(rows: list[dict], columns: list[str]) -> str:
    import pandas as pd
    return pd.DataFrame([{c: r.get(c, "") for c in columns} for r in rows], columns=columns).to_markdown(index=False)


def latex_tabular(rows: list[dict], columns: list[str]) -> str:
    lines = [r"\begin{tabular}{" + "l" * len(columns) + "}", r"\hline",
             " & ".join(latex_escape(c) for c in columns) + r" \\", r"\hline"]
    lines += [" & ".join(latex_escape(r.get(c, "")) for c in columns) + r" \\" for r in rows]
    return "\n".join(lines + [r"\hline", r"\end{tabular}", ""])


def write(cfg, out_dir: Path, name: str, title: str, intro: str, rows: list[dict], columns: list[str],
          quoted: list[dict]) -> Path:
    """<name>.md (intro, the rows' `columns` with 'how produced' moved into numbered notes under the table,
    the quoted section), .csv (every column, every seed's value, the quoted rows), .tex (the rows without
    'how produced', then the quoted rows) and <name>/study.json."""
    import pandas as pd
    commit = git_commit()
    head = f"# {title}\n\n{intro}\n\nTable written by `replearn` at commit {commit}.\n\n"
    quoted_head = ("\n\n## Quoted from the seed paper (its own data and setting, not measured by replearn; "
                   "docs/quoted.json)\n\n")
    short = [c for c in columns if c != "how produced"]
    if len(short) == len(columns):
        body = md_table(rows, short)
    else:   # a provenance cell runs to hundreds of characters: numbered notes keep the rows scannable
        names = short[:short.index("scale")] if "scale" in short else short[:1]     # the columns naming a row
        numbered = [{**r, "notes": f"[{i}]"} for i, r in enumerate(rows, 1)]
        body = md_table(numbered, short + ["notes"]) + "\n\n**How each row was produced**\n\n" + "\n".join(
            f"{i}. *{', '.join(str(r.get(c, '')) for c in names)}*: {r.get('how produced', '')}"
            for i, r in enumerate(rows, 1))
    body += quoted_head + md_table(quoted, QUOTED_COLUMNS) if quoted else ""
    atomic_write_text(out_dir / f"{name}.md", head + body + "\n")
    measured = [{"kind": "measured", **{c: r.get(c) for c in columns}, **r} for r in rows]
    atomic_write_text(out_dir / f"{name}.csv", pd.DataFrame(measured + quoted).to_csv(index=False))
    tex = (f"% {latex_escape(title)}: written by replearn at commit {latex_escape(commit)}\n"
           + latex_tabular(rows, short) + ("\n% quoted from the seed paper (docs/quoted.json)\n"
                                           + latex_tabular(quoted, QUOTED_COLUMNS) if quoted else ""))
    atomic_write_text(out_dir / f"{name}.tex", tex)
    atomic_write_json(out_dir / name / "study.json", {"config": to_dict(cfg), "columns": columns, "rows": rows,
                                                      "quoted": quoted, "provenance": provenance()})
    print(md_table(rows, short))
    return out_dir / f"{name}.md"


__all__ = ["write", "quoted_rows", "gan_columns", "probe_columns", "measure_column", "stats", "marked"]
