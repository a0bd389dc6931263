"""The table's noise and its files: McNemar's paired test against a hand count, the draws-and-test gain,
a scale label that says what ran, LaTeX that a TeX parser accepts, numeric csv columns, and the chain's
disk refusal."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from replearn.publish import noise, tables
from replearn import budget
from replearn.core.config import ConfigError
from replearn.probe.svm import pack_correct, unpack_correct


def test_packed_correctness_round_trips():
    right = np.random.default_rng(0).random(10_001) < 0.7
    assert np.array_equal(unpack_correct(pack_correct(right), len(right)), right)


def test_mcnemar_counts_discordant_pairs_and_its_p_value():
    n = 1000
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:600], b[:560] = True, True          # a right on 40 images b misses, never the reverse
    res = noise.mcnemar(pack_correct(a), pack_correct(b), n)
    assert res["only_a"] == 40 and res["only_b"] == 0 and res["diff"] == pytest.approx(0.04)
    assert res["p"] < 1e-10                 # 40 of 40 discordant pairs one way: 2 * 0.5^40
    se = np.sqrt(40 - 40 ** 2 / n) / n
    assert res["ci95"] == pytest.approx(1.96 * se)
    b[560:600], b[600:640] = False, True    # now 40 each way: no evidence of a difference
    same = noise.mcnemar(pack_correct(a), pack_correct(b), n)
    assert same["diff"] == 0 and same["p"] == pytest.approx(1.0)


def row(k_draws, correct=None, full=None, full_correct=None, n=1000):
    return {"_k_draws": k_draws, "_k_correct": correct, "full_acc": full, "_full_correct": full_correct,
            "_test_size": n}


def test_gain_k_pairs_draws_and_adds_the_test_images_noise():
    trained, control = [0.60, 0.62, 0.61, 0.63], [0.55, 0.56, 0.55, 0.57]
    g = noise.gain_k(row(trained), row(control))
    diffs = np.subtract(trained, control)
    assert g["gain"] == pytest.approx(diffs.mean())
    assert g["ci95"] == pytest.approx(1.96 * diffs.std(ddof=1) / 2)      # draws only: no per-image record
    assert g["beyond_noise"] is True and g["covers"] == "draws"
    n = 1000
    a, b = np.zeros(n, bool), np.zeros(n, bool)
    a[:600], b[:550], b[600:630] = True, True, True
    with_test = noise.gain_k(row(trained, pack_correct(a), n=n), row(control, pack_correct(b), n=n))
    assert with_test["ci95"] > g["ci95"] and with_test["covers"] == "draws + test sampling"
    assert noise.gain_text(with_test).endswith("*")
    small = noise.gain_k(row([0.60, 0.58]), row([0.59, 0.60]))
    assert noise.gain_text(small).endswith("(n.s.)")


def test_test_sampling_interval_is_binomial():
    assert noise.test_ci95(0.5, 10_000) == pytest.approx(1.96 * 0.005)
    assert noise.test_ci95(None, 100) is None


def test_scale_says_what_ran_not_which_preset_was_named():
    res = {"config": {"preset": "cpu"}}
    ran = {"pretrain": {"config": {"preset": "cpu", "steps": 2000, "max_minutes": 0.0, "sample_every": 100}}}
    assert tables.scale_of(res, ran) == "cpu"
    short = {"pretrain": {"config": {"preset": "cpu", "steps": 20, "max_minutes": 0.0, "sample_every": 5}}}
    assert tables.scale_of(res, short) == "custom (cpu preset, steps=20)"     # logging intervals do not count
    assert tables.scale_of({"config": {}}, {"pretrain": {"config": {}}}) == "custom"


def check_latex(text: str, columns: int) -> None:
    """What makes LaTeX fail on a table: unescaped specials, unbalanced braces or math, a row with the
    wrong number of cells."""
    body = [line for line in text.splitlines() if line.endswith(r"\\")]
    assert body, text
    for line in body:
        cells = re.split(r"(?<!\\)&", line[:-2])
        assert len(cells) == columns, line
        assert not re.search(r"(?<!\\)[%#_]", line), line
        stripped = line.replace(r"\$", "")
        assert stripped.count("$") % 2 == 0, line
        assert stripped.count("{") - stripped.count(r"\{") == stripped.count("}") - stripped.count(r"\}"), line


def test_latex_escapes_every_special_and_keeps_its_columns():
    rows = tables.quoted_rows() + [{
        "model": "DCGAN_x #1 & co", "status": "reproduced", "scale": "custom (cpu preset, steps=20)",
        "full_acc": 0.705, "full_ci95_test": 0.009, "k_acc": 0.599, "k_ci95_draws": 0.007, "k_per_class": 400,
        "_gain_full_text": "+5.5 ± 0.9 *", "_gain_k_text": "+0.3 ± 0.9 (n.s.)", "pretrain_steps": 20,
        "hardware": "CPU 100% busy", "commit": "abc", "how_produced": "x", "full_c_at_edge": True}]
    text = tables.latex_table(rows, "400 per class")
    check_latex(text, 7)
    assert r"DCGAN\_x \#1 \& co" in text and r"100\%" in text and r"$\pm$" in text and r"$^\dagger$" in text
    if shutil.which("pdflatex"):   # where TeX is installed, compile it for real
        import subprocess
        import tempfile
        from pathlib import Path
        with tempfile.TemporaryDirectory() as tmp:
            doc = Path(tmp) / "t.tex"
            doc.write_text("\\documentclass{article}\\begin{document}\n" + text + "\\end{document}\n")
            done = subprocess.run(["pdflatex", "-interaction=nonstopmode", doc.name], cwd=tmp, capture_output=True)
            assert done.returncode == 0, done.stdout[-2000:]


def test_csv_has_numeric_columns_beside_the_display_strings():
    frame = tables.csv_frame(tables.quoted_rows(), "400 per class")
    assert frame["full_acc"].dtype.kind == "f" and frame["k_acc"].dtype.kind == "f"
    assert {"scale", "status", "full_display", "k_display", "how_produced"} <= set(frame.columns)
    assert (frame["scale"] == "paper (quoted)").all()


def test_chain_refuses_before_any_work_when_the_disk_cannot_hold_its_peak(tmp_path, monkeypatch):
    from collections import namedtuple

    from test_chain import chain_config, labelled_images   # noqa: F401  (the chain's tiny sources)
    from replearn.core.store import write_image_cache
    from conftest import random_images
    images, labels = labelled_images(40, seed=1)
    src = {"root": tmp_path,
           "pretrain_data": str(write_image_cache(tmp_path / "pre.h5", random_images(16, seed=3), np.full(16, -1), [], {})),
           "train": str(write_image_cache(tmp_path / "train.h5", images, labels, list("abcd"), {})),
           "test": str(write_image_cache(tmp_path / "test.h5", images, labels, list("abcd"), {}))}
    cfg = chain_config(src)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(budget.shutil, "disk_usage", lambda _: Usage(10 ** 12, 0, 10 ** 6))
    with pytest.raises(ConfigError, match="needs about .* of disk at its peak .* keep_features=false"):
        from replearn import chain
        chain.run(cfg)
    assert not (tmp_path / "build").exists() or not any((tmp_path / "build").rglob("*.pt"))


def test_cost_line_gives_pretraining_at_the_median_step_beside_the_recorded_seconds(tmp_path):
    # a run whose log has 9 steps at 2 s and one slowed to 20 s by other work on the same cores
    run = tmp_path / "dcgan-abc"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(f'{{"step": {10 * i}, "sec_per_step": {20.0 if i == 3 else 2.0}}}\n'
                                           for i in range(1, 11)))
    base = {"status": "reproduced", "model": "DCGAN", "k_per_class": 400, "hardware": "CPU test",
            "pretrain_steps": 100, "_run_key": "abc", "_run_dir": run}
    rows = [{**base, "_control": False, "_features": "f1", "seconds": {"pretrain": 400.0, "features": 60.0}},
            {**base, "_control": True, "_features": "f0", "seconds": {"features": 60.0}}]
    text = tables.cost_text(rows, [])
    assert "pretraining " + tables.duration(400.0) in text
    assert f"({tables.duration(200.0)} at each run's median step time)" in text
    # without its log (a run folder that is gone) only the recorded seconds are given
    text = tables.cost_text([{**r, "_run_dir": None} for r in rows], [])
    assert "median step" not in text and "pretraining " + tables.duration(400.0) in text


def test_header_explains_the_equalised_rows_only_when_the_table_has_them():
    from replearn.publish import tables
    cfg = tables.Config(results="", name="cifar10-cpu", quoted=False)
    plain = [{"model": "DCGAN (BCE) (reproduced)", "scale": "cpu", "status": "reproduced"}]
    equal = plain + [{"model": "DCGAN (BCE) (reproduced) [SVM input: layers equalised]", "scale": "cpu",
                      "status": "reproduced"}]
    assert "layer_scale=equal" not in tables.header(cfg, plain, "400 per class", "")
    assert "layer_scale=equal" in tables.header(cfg, equal, "400 per class", "")
