"""The svm stage: a feature file -> results JSON (`run`), with progress, resume and reuse by key.

Progress and reuse: `<out stem>.partial.json` (atomic) holds the finished settings and, within
`400`, the selection scores per C and draw and the final draws' test accuracies so far, for one
config and one feature file (its `key` attr, else path|size|mtime). A rerun of the same config
resumes from it (recorded in `resumed_from`) and reproduces the uninterrupted run's numbers: every
fit depends only on its draw and C (final draws warm-start from draw 0's model, refitted cold after a
resume; an upward selection extension from its draw's previous model, refitted by the same steps).
A completed run writes the results and removes the progress file. The results carry
`key` = stage.artifact_key("svm", config less out/device/gram_cache/preset, features=identity); when
`out` holds a complete result with the same key, `run` returns it without fitting. `content_key` is the
same with the feature file's bytes (sha256) for its identity: a result of another feature file in the
same or a sibling folder with this content key is copied, with `reused_from` naming it, not refitted.

Results JSON (accuracies are fractions in 0..1, C in sum form):
    {"config", "key", "content_key", "complete": true, "provenance", "resumed_from": null | {...},
     "reused_from": {"results", "features"} (only when copied from a twin),
     "features": {"path", "identity", "attrs": {kind, model, config, provenance, layer_names, ...}},
     "validation", "c_scale": {"mode", "factor", "reference_mean_sq_norm"},
     "settings": {"full": {"c" (refit C), "c_select", "refit_c_rule", "val_curve": {C: acc}, "grid",
                           "c_at_edge", "c_extended": {"up", "down"}, "c_scale_factor", "presearch",
                           "test_acc", "solver", "seconds"},
                  "400":  {"c", "val_curve": {C: mean acc}, "val_draws": {C: [acc...]}, "grid", "c_at_edge",
                           "c_extended", "c_scale_factor", "draws": [acc...], "mean", "std", "ci95",
                           "solver", "seconds", "selection_seconds", "final_seconds", "gram_cache"}}}
    solver = {fits, recorded, converged_fits, not_converged: [[C, "select 3" | "final 7" | "select" |
              "refit" | "presearch", rel_grad, stop]...], max_rel_grad, max_iterations, max_jitter,
              fit_seconds: {"select" | "final" | "presearch" | "refit": seconds}, cg_iterations (all fits),
              stop_rules: {kind: [1e-06 | "liblinear"]} (the `tol` each kind of fit stopped at)}
A PNG of validation accuracy against C is written beside it (`<out stem>.png`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ...core.config import ConfigError, to_dict
from ...core.stage import Stage, artifact_key, keyed, require_input
from ...train.runs import read_json
from ...core.store import FeatureFile
from ...core.utils import atomic_path, atomic_write_json, check_writable, pick_device, provenance
from .protocol import (Config, NORM_REFERENCE, SplitScorer, _column_stats, _preprocess_inplace, check_config,
                       check_features, layer_bounds, layer_factors, load_train, split_validation)
from .search import PhaseBars, Setting400, c_scale_factor, run_full


# ============================================================================ progress and reuse
def features_identity(ff: FeatureFile) -> str:
    """The feature file's `key` attr when it has one, else path|size|mtime_ns."""
    key = ff.attrs.get("key")       # read_attrs: native or (files from before attrs_format=2) JSON text
    if isinstance(key, str) and key:
        return key
    stat = ff.path.stat()
    return f"{ff.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


# keys added after results were made, with the value every older result had: they re-key nothing
ADDED_KEYS = {"c_refine": True, "select_stop": "tight"}


def results_key(cfg: Config, features_id: str) -> str:
    return artifact_key("svm", keyed(to_dict(cfg), ADDED_KEYS), ignore=("out", "device", "gram_cache", "preset"),
                        features=features_id)


def progress_path(out: Path) -> Path:
    """<out stem>.partial.json (features.svm.json -> features.svm.partial.json): not a `*.svm.json`."""
    return out.with_suffix(".partial.json")


class Progress:
    """What a run of this config on this feature file has finished: {identity, settings {name: result},
    partial {name: state}}; rewritten atomically after every unit of work. A file for another
    identity (config or features) is ignored, and replaced at the first save."""

    def __init__(self, out: Path, identity: dict):
        self.path = progress_path(out)
        old = read_json(self.path)
        self.data = {"identity": identity, "settings": {}, "partial": {}}
        self.resumed_from = None
        if old and old.get("identity") == json.loads(json.dumps(identity)):
            self.data = {"identity": identity, "settings": {k: _float_keys(v) for k, v in old["settings"].items()},
                         "partial": {k: _float_keys(v) for k, v in old["partial"].items()}}
            self.resumed_from = self._summary()

    def _summary(self) -> dict:
        state = self.data["partial"].get("400", {})
        return {"progress_file": str(self.path), "settings_done": sorted(self.data["settings"]),
                "select_scores": sum(len(v) for v in state.get("val_draws", {}).values()),
                "final_draws_done": len(state.get("draws", []))}

    def state(self, name: str) -> dict:
        return self.data["partial"].setdefault(name, {})

    def save(self) -> None:
        atomic_write_json(self.path, _json_keys(self.data))

    def finish(self, name: str, result: dict) -> None:
        self.data["settings"][name] = result
        self.data["partial"].pop(name, None)
        self.save()


def _float_keys(result: dict) -> dict:
    """C-keyed maps read back from JSON: their string keys become floats again."""
    return {k: ({float(c): v for c, v in value.items()} if k in ("val_curve", "val_draws") else value)
            for k, value in result.items()}


def up_to_date(out: Path, key: str) -> bool:
    """A complete results file at `out` made with exactly this key."""
    record = read_json(out) if out.exists() else None
    return bool(record) and record.get("complete") is True and record.get("key") == key


def finished_results(cfgs: list[Config], features_key: str) -> list[Path] | None:
    """The results files of these configs on one feature file (key `features_key`), when every one is
    finished by key; else None. Checked before extracting, so finished results need no feature file."""
    planned = [planned_out(c, features_key) for c in cfgs]
    done = all(up_to_date(p, results_key(c, features_key)) for p, c in zip(planned, cfgs))
    return planned if done else None


def planned_out(cfg: Config, features_key: str) -> Path:
    """Where `run` writes the results for a feature file whose key is `features_key` (features.plan): the
    file need not exist, so a chain finds finished results without extracting their features again."""
    return default_out(cfg, results_key(cfg, features_key))


# ============================================================================ the stage
def variant_label(cfg: Config) -> str:
    """What a results file holds, for its name: settings (400 per class as '400pc'), then the SVM input
    when it is not the paper's (layers equalised, standardised, L2-normalised) and a fixed C."""
    label = "+".join("full" if s == "full" else f"{cfg.per_class}pc" for s in cfg.settings)
    label += "-layers-equal" if cfg.layer_scale == "equal" else ""
    label += "-standardized" if cfg.standardize else ""
    label += "-l2" if cfg.l2_normalize else ""
    return label + ("-fixed-c" if cfg.fixed_c > 0 else "")


def default_out(cfg: Config, key: str) -> Path:
    """<features stem>.svm-<variant>-<key>.json (e.g. features-step0002000-<k>.svm-full+400pc-<k>.json): another
    config or features file never overwrites a result. A result made before the variant was in the name
    (<stem>.svm-<key>.json) is still found and reused."""
    if cfg.out:
        return Path(cfg.out)
    legacy = Path(cfg.features).with_name(f"{Path(cfg.features).stem}.svm-{key}.json")
    if legacy.exists():
        return legacy
    return Path(cfg.features).with_name(f"{Path(cfg.features).stem}.svm-{variant_label(cfg)}-{key}.json")


def plot_curves(results: dict, path: Path, per_class: int = 400) -> None:
    import textwrap
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        if res.get("val_curve"):
            cs = sorted(res["val_curve"])
            setting = "full" if name == "full" else f"{per_class} per class"
            ax.plot(cs, [100 * res["val_curve"][c] for c in cs], marker="o", label=f"{setting} (C={res['c']:.3g})")
    if ax.lines:
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("C (LinearSVC sum form)")
    ax.set_ylabel("validation accuracy (%)")
    # the file name is long (step, keys): wrapped under a short title, so that neither is cut off
    ax.set_title("L2-SVM C selection\n" + "\n".join(textwrap.wrap(path.stem, 60)), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run(cfg: Config) -> Path:
    """Evaluate a feature file with the linear L2-SVM protocol (full and 400 per class) -> results JSON."""
    return STAGE.run(cfg)


def checked(cfg: Config) -> Config:
    require_input(cfg.features, "features", "a feature file that `replearn features` (or `kmeans`) wrote, e.g. "
                  "build/<preset>/<model>-<key>/features-step<N>-<key>.h5")
    check_config(cfg)
    return cfg


def key_of(cfg: Config) -> str:
    with FeatureFile(cfg.features) as ff:
        return results_key(cfg, features_identity(ff))


# ============================================================================ reuse by content
def content_key(cfg: Config, digest: str) -> str:
    """The results key with the feature file's bytes (FeatureFile.digest) in place of its path and identity."""
    return results_key(dataclasses.replace(cfg, features=""), f"sha256:{digest}")


def identical_result(cfg: Config, ckey: str, out: Path) -> Path | None:
    """A finished result of this config on a feature file with the same bytes, in the feature file's folder
    or a sibling one (the chain's runs under build/<preset>/): two runs whose untrained critics are the
    same network (DCGAN's and the BN WGAN-GP's at one seed) give identical step-0 features, so the second
    control's fits would repeat the first's to the last bit."""
    folder = Path(cfg.features).resolve().parent
    pattern = f"*.svm-{variant_label(cfg)}-*.json"
    for path in sorted([*folder.glob(pattern), *folder.parent.glob(f"*/{pattern}")]):
        if path.resolve() == out.resolve():
            continue
        record = read_json(path)
        if record and record.get("complete") is True and record.get("content_key") == ckey:
            return path
    return None


def reused_record(twin: Path, ff: FeatureFile, cfg: Config, features_id: str, digest: str) -> dict:
    """The twin's results (its fits, their provenance and seconds) under this feature file's name;
    `reused_from` says whose they are, and the table counts no SVM time for them."""
    record = read_json(twin)
    print(f"svm: {cfg.features} holds the same bytes (sha256 {digest[:12]}) as {record['features']['path']}: "
          f"its results {twin.name} are reused", flush=True)
    source = {k: record["features"].get(k) for k in ("path", "identity")}
    record.update(config=to_dict(cfg), reused_from={"results": str(twin), "features": source}, resumed_from=None,
                  features={"path": str(cfg.features), "attrs": ff.attrs, "identity": features_id})
    return record


def fitted_seconds(record: dict, setting: str) -> float:
    """Seconds this result's `setting` spent fitting here: none for results copied from a twin."""
    return 0.0 if record.get("reused_from") else float(record["settings"][setting].get("seconds") or 0.0)


def fit_and_publish(cfg: Config, out: Path, key: str) -> Path:
    """Every setting (resuming from the progress file), then the results JSON and its plot. Results of the
    same config on a feature file with the same bytes are reused instead of fitted again."""
    check_writable(out.parent)
    with FeatureFile(cfg.features) as ff:
        digest = ff.digest()
        ckey = content_key(cfg, digest)
        twin, features_id = identical_result(cfg, ckey, out), features_identity(ff)
        if twin:
            record = reused_record(twin, ff, cfg, features_id, digest)
        else:
            record = evaluate(ff, cfg, out, features_id)
    record.update(key=key, content_key=ckey)
    atomic_write_json(out, _json_keys(record))
    plot_curves(record["settings"], out.with_suffix(".png"), cfg.per_class)
    progress_path(out).unlink(missing_ok=True)
    return out


def evaluate(ff: FeatureFile, cfg: Config, out: Path, features_id: str) -> dict:
    """Checks, loads, then runs every setting not finished in the progress file -> the results record."""
    X, y, n_rest, stats, layer_factors_used = load_checked(ff, cfg)                  # N x D, N
    test = SplitScorer(ff, cfg, stats)          # scanned (finite) before any fit
    factor = c_scale_factor(X, cfg)
    progress = Progress(out, {"config": to_dict(cfg), "features": features_id})
    device = pick_device(cfg.device)
    results, bar = {}, PhaseBars()
    try:
        for name in cfg.settings:
            if name in progress.data["settings"]:
                results[name] = progress.data["settings"][name]
                continue
            if name == "400":
                results[name] = Setting400(X, y, n_rest, test, cfg, factor, device, bar, progress.state(name),
                                           progress.save).run()
            else:
                results[name] = run_full(X, y, n_rest, test, cfg, factor, device, bar)
            progress.finish(name, results[name])
    finally:
        bar.close()
    return {"config": to_dict(cfg), "complete": True, "provenance": provenance(),
            "features": {"path": str(cfg.features), "attrs": ff.attrs, "identity": features_id},
            "validation": {"size": int(len(X) - n_rest), "seed": cfg.seed, "from": "train"}, "train_rows": int(len(X)),
            "c_scale": {"mode": cfg.c_scale, "factor": factor, "reference_mean_sq_norm": NORM_REFERENCE},
            "layer_scale": {"mode": cfg.layer_scale, "factors": layer_factors_used},
            "resumed_from": progress.resumed_from, "settings": results}


def load_checked(ff: FeatureFile, cfg: Config) -> tuple[np.ndarray, np.ndarray, int, tuple | None, dict | None]:
    """(X, y, n_rest, stats, layer factors): the checked train split, train-minus-val rows first, preprocessed;
    stats ((mean, std) per column) take test rows the same way; layer factors {layer: f} with layer_scale=equal."""
    labels = check_features(ff)["train"]
    if cfg.val_size >= len(labels):
        raise ConfigError(f"val_size={cfg.val_size} leaves no training rows in {cfg.features}; lower val_size")
    rest, val = split_validation(labels, cfg.val_size, cfg.seed)
    order = np.concatenate([rest, val])        # train-minus-val first, so both parts are views
    X, y = load_train(ff, order, cfg), labels[order]                                # N x D, N
    stats, scaled = _column_stats(X) if cfg.standardize else None, None
    if stats is not None:
        _preprocess_inplace(X, dataclasses.replace(cfg, l2_normalize=False), stats)
    if cfg.layer_scale == "equal":
        # folded into the stats that test rows go through: (x - mean) / (std / f) = f (x - mean) / std
        bounds = layer_bounds(ff, cfg)
        f = layer_factors(X, bounds)                                                 # D
        scaled = {name: float(f[a]) for name, a, _ in bounds}
        for start in range(0, len(X), 4096):
            X[start:start + 4096] *= f
        mean, std = stats if stats is not None else (np.zeros_like(f), np.ones_like(f))
        stats = (mean, std / f)
    return X, y, len(rest), stats, scaled


def _json_keys(obj):
    """JSON object keys must be strings: C values become repr-exact strings."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else repr(float(k))): _json_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_keys(v) for v in obj]
    return obj


# the results and their .partial.json: one process at a time
STAGE = Stage("svm", resolve=checked, key=key_of, out=default_out,
              finished=lambda cfg, out, key: up_to_date(out, key), build=fit_and_publish)
