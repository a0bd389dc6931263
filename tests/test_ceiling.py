"""benchmarks/ceiling.py: fields and signs at tiny sizes, and its FLOP count against the convs' closed form.

No timing is asserted: the numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import pytest
import torch

from conftest import load_benchmark
from replearn.models import zoo


ceiling = load_benchmark("ceiling")


def test_measure_returns_positive_rates_with_the_expected_fields():
    out = ceiling.measure(**ceiling.TINY)
    assert set(out["gflops"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in out["gflops"].values()) and out["bandwidth_gbs"] > 0
    for precision in ("fp32", "bf16"):
        assert out["conv"][precision]["gflops"] > 0
        assert out["skinny"][precision]["forward"]["gbs"] > 0 and out["skinny"][precision]["backward"]["gflops"] > 0
    assert out["bandwidth"]["read_gbs"] > 0 and out["threads"] == torch.get_num_threads()
    assert out["machine"] and "vector_units" in out
    summary = ceiling.summary(out)
    assert {"gflops_fp32", "gflops_bf16", "bandwidth_gbs", "machine", "vector_units", "threads"} <= set(summary)


def critic_conv_flops(critic: torch.nn.Module, image_size: int = 32) -> int:
    """sum over the critic's convs of 2 * Cin * Cout * 9 * Hout * Wout, per image."""
    total, size = 0, image_size
    for module in critic.modules():
        if isinstance(module, torch.nn.Conv2d):
            size //= module.stride[0]
            total += 2 * module.in_channels * module.out_channels * 9 * size * size
    return total


def test_flop_count_of_a_dcgan_critic_forward_matches_its_convs():
    _, critic = zoo.build_models("dcgan")
    critic.eval()
    x = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        work = ceiling.count_work(lambda: critic(x))
    expected = 2 * critic_conv_flops(critic)      # + the 8192 -> 1 head, 2 x 8192 per image
    assert work["flops"] == pytest.approx(expected, rel=0.02)
    assert work["bytes"] > x.numel() * 4                     # it read at least its input and the weights


def test_fraction_and_verdict():
    limits = {"gflops": {"fp32": 100.0, "bf16": 200.0}, "bandwidth_gbs": 10.0}
    at = ceiling.fraction(80e9, 1e9, "fp32", limits)
    assert at["fraction_of_ceiling"] == pytest.approx(0.8) and at["bound"] == "compute"
    assert at["verdict"].startswith("at the ceiling")
    below = ceiling.fraction(80e9, 1e9, "bf16", limits)
    assert below["fraction_of_ceiling"] == pytest.approx(0.4) and below["verdict"].startswith("below the ceiling")
    memory = ceiling.fraction(1e9, 9e9, "fp32", limits, bytes_are_traffic=True)       # bytes that miss the cache
    assert memory["bound"] == "memory" and memory["fraction_of_ceiling"] == pytest.approx(0.9)
    unfused = ceiling.fraction(1e9, 9e9, "fp32", limits)     # op-level bytes: an upper bound, not the verdict
    assert unfused["bound"] == "compute" and unfused["fraction_of_ceiling"] == pytest.approx(0.01)
    assert unfused["fraction_of_bandwidth"] == pytest.approx(0.9)


def test_a_run_with_limited_kernels_writes_beside_the_real_kinds_record(monkeypatch):
    """benchmarks/isa.sh runs emulate another CPU kind: their JSON must not replace a record of this machine's."""
    from pathlib import Path
    from replearn.core.utils import cpu_vector_units
    monkeypatch.delenv("REPLEARN_CPU_ISA", raising=False)
    assert ceiling.result_path(Path("results/svm.json")) == Path("results/svm.json")
    monkeypatch.setenv("REPLEARN_CPU_ISA", "AVX2")
    limited = cpu_vector_units(limit="") not in ("", "AVX2")        # this CPU has more than AVX2 to limit
    expected = "results/svm_avx2-limited.json" if limited else "results/svm.json"
    assert ceiling.result_path(Path("results/svm.json")) == Path(expected)
