"""How numbers and names are written in every table (the headline one and the studies'): percentages,
durations, a data spec's short name, LaTeX escapes.
"""
from __future__ import annotations


def percent(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "")


def split_name(spec: str) -> str:
    spec = str(spec)
    return spec[spec.index("shared/data/") + len("shared/data/"):].replace("/train.parquet", "-train") \
        if "shared/data/" in spec else spec


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"




def latex_escape(text: str) -> str:
    out = str(text)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}"),
                 ("±", r"$\pm$"), ("†", r"$^\dagger$"), ("*", r"$^*$")):
        if a in ("{", "}"):
            continue
        out = out.replace(a, b)
    return out
