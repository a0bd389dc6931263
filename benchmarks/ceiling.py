"""This machine's own ceiling: what its matmul units and memory do per second, measured beside a benchmark.

    flock /tmp/replearn-heavy.lock .venv/bin/python benchmarks/ceiling.py [--quick]

Measured with torch on all its threads (`torch.get_num_threads()`), best of a few repeats after a warm-up:
  gemm        a 2048^3 square matmul, float32 and bfloat16: the compute ceiling (GFLOP/s)
  skinny      the SVM's CG products on an N x 28672 design (N = 40,000, fewer when memory is short, 4,000
              with --quick): forward A W^T (W: 10 x 28672) and backward R^T A, float32 and bfloat16; these
              read the design once per product, so they are bandwidth-bound: GFLOP/s and GB/s both recorded;
              float32 also through numpy's BLAS in 2048-row blocks (`numpy`), as the solver runs it; bfloat16
              only on CPUs with bf16 units (elsewhere the solver makes no bf16 copy)
  conv        the DCGAN critic's conv3 (3x3, 128 -> 256 channels, 16 x 16, batch 64, channels_last),
              float32 and bfloat16 (GFLOP/s): what the library gets on the critic's own shapes
  bandwidth   a large tensor copy (1 GiB, 256 MiB with --quick), GB/s counting read + write (STREAM's
              convention; the write's read-for-ownership is not counted), and a read-only pass (a sum)
The compute ceiling of a precision is the best of its square GEMM and its conv (both run the machine's
matmul units; whichever the library drives faster is what the machine demonstrably does), the memory
ceiling the copy bandwidth. The benchmarks call `measure` in their own run and divide what a stage
achieves by it (`fraction`): FLOP/s over the compute ceiling of the stage's precision, bytes/s over the
bandwidth; the larger of the two is the fraction of the roofline at the stage's FLOPs per byte.
A busy machine understates every ceiling: the load average before and after is recorded beside them.
`count_work` counts a unit of work's FLOPs (torch.utils.flop_counter.FlopCounterMode: matmuls, convs,
attention; elementwise work is not counted) and the bytes its aten ops read and write (unfused: every op
reads its inputs and writes its outputs once, an upper bound on memory traffic that caches reduce).
Prints JSON and writes benchmarks/results/ceiling.json (ceiling_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from replearn.core.utils import atomic_write_json, cpu_has_bf16, cpu_vector_units, hardware, provenance  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SVM_DIMS, SVM_CLASSES = 28672, 10           # the DCGAN critic's pooled features; CIFAR-10's classes
CONV = dict(batch=64, c_in=128, c_out=256, size=16)    # the critic's conv3 at 32 px
AT_CEILING = 0.7                            # from here on a stage counts as at the ceiling (issue 40)


def result_path(path: Path) -> Path:
    """Where a benchmark writes `path`: beside it, as <stem>_<isa>-limited.json, when REPLEARN_CPU_ISA limits
    this machine's kernels (benchmarks/isa.sh), so that an emulated kind's figures never replace a real kind's."""
    limit = os.environ.get("REPLEARN_CPU_ISA", "")
    if not limit or cpu_vector_units() == cpu_vector_units(limit=""):
        return Path(path)
    return Path(path).with_name(f"{Path(path).stem}_{limit.lower()}-limited{Path(path).suffix}")


# ============================================================================ timing
def best_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Fastest of `repeats` timed calls after `warmup` untimed ones (the machine is shared: the best
    run is the one least disturbed)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ============================================================================ the ceilings
def gemm(n: int, dtype: torch.dtype, repeats: int) -> dict:
    a, b = torch.rand(n, n).to(dtype), torch.rand(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    seconds = best_seconds(lambda: torch.mm(a, b, out=out), repeats)
    return {"shape": [n, n, n], "seconds": seconds, "gflops": 2 * n ** 3 / seconds / 1e9}


def skinny(rows: int, dtype: torch.dtype, repeats: int) -> dict:
    """The SVM's two CG products on a rows x 28672 design, laid out as `svm.design._Design` runs them."""
    a = torch.empty(rows, SVM_DIMS).uniform_(-1, 1).to(dtype)               # N x P
    w = torch.rand(SVM_CLASSES, SVM_DIMS).to(dtype)                         # K x P
    r = torch.rand(SVM_CLASSES, rows).to(dtype)                             # K x N
    flops, nbytes = 2 * rows * SVM_DIMS * SVM_CLASSES, a.numel() * a.element_size()
    forward = best_seconds(lambda: F.linear(a, w), repeats)                 # N x K
    backward = best_seconds(lambda: r @ a, repeats)                         # K x P
    rate = lambda seconds: {"seconds": seconds, "gflops": flops / seconds / 1e9, "gbs": nbytes / seconds / 1e9}
    out = {"shape": [rows, SVM_DIMS, SVM_CLASSES], "forward": rate(forward), "backward": rate(backward)}
    if dtype == torch.float32:   # numpy's BLAS (OpenBLAS), which the solver's float32 primal products use
        an, wn, rn, block = a.numpy(), w.numpy().T, r.numpy(), 2048
        y = np.empty((rows, SVM_CLASSES), dtype=np.float32)

        def np_forward():
            for i in range(0, rows, block):
                np.matmul(an[i:i + block], wn, out=y[i:i + block])

        def np_backward():
            top = np.zeros((SVM_CLASSES, SVM_DIMS))
            for i in range(0, rows, block):
                top += rn[:, i:i + block] @ an[i:i + block]
        out["numpy"] = {"forward": rate(best_seconds(np_forward, repeats)),
                        "backward": rate(best_seconds(np_backward, repeats))}
    return out


def conv(dtype: torch.dtype, repeats: int, batch: int = CONV["batch"]) -> dict:
    c_in, c_out, size = CONV["c_in"], CONV["c_out"], CONV["size"]
    x = torch.rand(batch, c_in, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.rand(c_out, c_in, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    flops = 2 * batch * c_in * c_out * 9 * size * size
    with torch.no_grad():
        seconds = best_seconds(lambda: F.conv2d(x, w, padding=1), repeats)
    return {"shape": {"batch": batch, "c_in": c_in, "c_out": c_out, "hw": size, "kernel": 3},
            "seconds": seconds, "gflops": flops / seconds / 1e9}


def bandwidth(nbytes: int, repeats: int) -> dict:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    copy = best_seconds(lambda: dst.copy_(src), repeats)
    read = best_seconds(src.sum, repeats)
    return {"bytes": src.numel() * 4, "copy_seconds": copy, "copy_gbs": 2 * nbytes / copy / 1e9,
            "read_seconds": read, "read_gbs": nbytes / read / 1e9}


def skinny_rows(wanted: int) -> int:
    """`wanted` rows, fewer when the float32 design and its bf16 copy would take over a third of free memory."""
    free = available_bytes()
    fit = int(free / 3 / (SVM_DIMS * 6)) if free else wanted
    return max(1000, min(wanted, fit))


def measure(gemm_n: int = 2048, svm_rows: int = 40000, copy_bytes: int = 1 << 30, conv_batch: int = CONV["batch"],
            repeats: int = 5) -> dict:
    """This machine's ceilings (see the module docstring); smaller arguments for a quick check."""
    started = time.perf_counter()
    rows = skinny_rows(svm_rows)
    # the load average shows a measurement that shared its cores with other work (the machine is shared)
    out = {"machine": hardware(), "vector_units": cpu_vector_units(), "threads": torch.get_num_threads(),
           "torch": str(torch.__version__), "load_average_before": os.getloadavg()[0]}
    # without bf16 units torch's bf16 GEMM is a slow fallback (2048^3 took 43 s with AVX2 kernels): 512^3 shows it
    out["gemm"] = {p: gemm(gemm_n if p == "fp32" or cpu_has_bf16() else min(gemm_n, 512), dt, repeats)
                   for p, dt in DTYPES.items()}
    out["conv"] = {p: conv(dt, repeats, conv_batch) for p, dt in DTYPES.items()}
    # bf16 skinny products only where the solver makes a bf16 copy (bf16 units): elsewhere torch runs bf16 on a
    # slow fallback (one 40,000-row product took 69 s with AVX2 kernels), and nothing here runs it
    skinny_dtypes = DTYPES if cpu_has_bf16() else {"fp32": torch.float32}
    out["skinny"] = {p: skinny(rows, dt, max(2, repeats // 2)) for p, dt in skinny_dtypes.items()}
    out["bandwidth"] = bandwidth(copy_bytes, repeats)
    out["skinny_rows_asked"] = svm_rows
    out["gflops"] = {p: max(out["gemm"][p]["gflops"], out["conv"][p]["gflops"]) for p in DTYPES}   # compute ceilings
    out["bandwidth_gbs"] = out["bandwidth"]["copy_gbs"]                       # the memory ceiling
    out["load_average_after"] = os.getloadavg()[0]
    out["seconds"] = time.perf_counter() - started
    return out


QUICK = dict(svm_rows=4000, copy_bytes=1 << 28, repeats=3)     # the GEMM stays 2048^3: 1024^3 ran at half its rate
TINY = dict(gemm_n=128, svm_rows=64, copy_bytes=1 << 20, conv_batch=2, repeats=1)


# ============================================================================ a unit of work
class ByteCounter(TorchDispatchMode):
    """Bytes every aten op reads (its tensor arguments) and writes (its outputs); views move nothing."""

    def __init__(self):
        super().__init__()
        self.read = self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            return out                                                          # a view
        self.read += sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs))[0]
                         if isinstance(t, torch.Tensor))
        self.written += sum(t.numel() * t.element_size() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


class GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: every FLOP goes to 'Global', no module hooks. The
    tracker's backward hooks fail inside autograd.grad (WGAN-GP's gradient penalty: "A leaf node was passed
    to _will_engine_execute_node but we are currently running autograd.grad()"); totals do not need them."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_work(fn: Callable[[], object]) -> dict:
    """FLOPs (FlopCounterMode's formulas, totals only) and unfused aten-op bytes of one call of `fn`,
    forward and backward (double backward included)."""
    flops = FlopCounterMode(display=False)
    flops.mod_tracker = GlobalOnly()
    with flops, ByteCounter() as moved:
        fn()
    return {"flops": int(flops.get_total_flops()), "bytes": int(moved.read + moved.written),
            "bytes_read": int(moved.read), "bytes_written": int(moved.written)}


OP_LEVEL = "unfused aten-op bytes: an upper bound on traffic, much of it in cache; not used for the verdict"


def fraction(flops_per_second: float, bytes_per_second: float, precision: str, ceiling: dict,
             bytes_note: str = OP_LEVEL, bytes_are_traffic: bool = False) -> dict:
    """A stage's rates against this machine's: FLOP/s over the compute ceiling of its precision, bytes/s
    over the copy bandwidth. Where the bytes are memory traffic (`bytes_are_traffic`: an analytic count of
    data that cannot stay in cache, e.g. the SVM design read twice per CG product), `fraction_of_ceiling`
    is the larger of the two: the fraction of the roofline min(peak, bandwidth x FLOPs per byte) at the
    stage's own FLOPs per byte, and `bound` names the roof that applies. Where they are the unfused
    aten-op count (the default), they overstate the traffic (a fused or cache-resident step moves far
    less: K-means's 19 MB encoding buffers stay in L3), so the fraction is the compute one alone and
    `fraction_of_bandwidth` is recorded as an upper bound."""
    of_flops = flops_per_second / 1e9 / ceiling["gflops"][precision]
    of_bytes = bytes_per_second / 1e9 / ceiling["bandwidth_gbs"]
    bound = "memory" if bytes_are_traffic and of_bytes > of_flops else "compute"
    best = max(of_flops, of_bytes) if bytes_are_traffic else of_flops
    return {"gflops": flops_per_second / 1e9, "gbs": bytes_per_second / 1e9, "precision": precision,
            "ceiling_gflops": ceiling["gflops"][precision], "ceiling_gbs": ceiling["bandwidth_gbs"],
            "fraction_of_flops_ceiling": of_flops, "fraction_of_bandwidth": of_bytes, "fraction_of_ceiling": best,
            "bound": bound, "bytes_counted_as": bytes_note, "verdict": verdict(best, bound, precision)}


def verdict(share: float, bound: str, precision: str) -> str:
    what = f"{precision} matmul peak" if bound == "compute" else "copy bandwidth"
    if share >= AT_CEILING:
        if bound == "compute":
            return (f"at the ceiling ({share:.0%} of the {what}): only fewer FLOPs, bf16 units or a GPU make it faster")
        return f"at the ceiling ({share:.0%} of the {what}): only fewer bytes (narrower data) or a GPU make it faster"
    return f"below the ceiling ({share:.0%} of the {what}): the stage's own code leaves room"


def summary(ceiling: dict) -> dict:
    return {"gflops_fp32": ceiling["gflops"]["fp32"], "gflops_bf16": ceiling["gflops"]["bf16"],
            "bandwidth_gbs": ceiling["bandwidth_gbs"], "read_gbs": ceiling["bandwidth"]["read_gbs"],
            "gemm_gflops_fp32": ceiling["gemm"]["fp32"]["gflops"], "gemm_gflops_bf16": ceiling["gemm"]["bf16"]["gflops"],
            "conv_gflops_fp32": ceiling["conv"]["fp32"]["gflops"], "conv_gflops_bf16": ceiling["conv"]["bf16"]["gflops"],
            "skinny_backward_gbs_fp32": ceiling["skinny"]["fp32"]["backward"]["gbs"],
            "skinny_backward_gbs_bf16": ceiling["skinny"].get("bf16", {}).get("backward", {}).get("gbs"),
            "machine": ceiling["machine"], "vector_units": ceiling["vector_units"], "threads": ceiling["threads"],
            "load_average": [ceiling["load_average_before"], ceiling["load_average_after"]]}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few seconds); writes ceiling_quick.json")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or result_path(RESULTS / ("ceiling_quick.json" if args.quick else "ceiling.json"))
    ceiling = measure(**(QUICK if args.quick else {}))
    record = {"summary": summary(ceiling), "ceiling": ceiling, "args": {"quick": args.quick}, "provenance": provenance()}
    atomic_write_json(out, record)
    print(json.dumps(record, indent=2))
    return out


if __name__ == "__main__":
    main()
