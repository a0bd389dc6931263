"""Training throughput: replearn's loop against a textbook loop, in the same run.

    flock /tmp/replearn-heavy.lock .venv/bin/python benchmarks/train.py [--dcgan-steps 3] [--gp-steps 1] [--rounds 3]

DCGAN and WGAN-GP at the papers' widths, 32x32, batch 64 (for both, so that the two losses are
compared at one batch size). Throughput is real images per second, counted as the protocol counts
them: every critic step consumes one batch of real images (DCGAN: 1 per generator step; WGAN-GP: 5).

Configurations, each with the same nets (built by `zoo.build_models` from the same resolved config):
  reference  the textbook loop written here: float32, contiguous NCHW, a DataLoader over a
             TensorDataset of float images; PyTorch DCGAN example (separate real / fake passes) and
             the usual WGAN-GP loop (three critic passes, autograd.grad(create_graph=True) on
             interpolates).
  default    replearn's `Runner.train_step` as configured by default: bf16 autocast where the CPU
             has bf16 units, channels_last, uint8 data indexed in memory.
  fp32       the same loop with precision=fp32 (channels_last still on).
  compile    the default configuration with compile=True (compile time reported apart).
reference, default and fp32 are timed in interleaved rounds (a few generator steps each), every
timing in a fresh process, and the median round counts (see `measure` for why).
Against the machine's own ceiling (benchmarks/ceiling.py, measured in the same run): the FLOPs and
unfused aten-op bytes of one generator step (the unit of work; WGAN-GP: 5 critic updates and 1
generator update) are counted with FlopCounterMode in the timing process, after the timed steps, and
`fraction_of_ceiling` is the achieved FLOP/s over the matmul rate of the configuration's precision.
Writes benchmarks/results/train.json (--quick: one round, one timed step, no compile, small ceiling
sizes, train_quick.json; a few minutes on 2 cores, no figure to compare with the full run's).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from replearn.models import nets, zoo  # noqa: E402
from replearn.train import pretrain  # noqa: E402
from replearn.core.utils import atomic_write_json, hardware, provenance  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ceiling  # noqa: E402

OUT = ceiling.result_path(Path(__file__).resolve().parent / "results" / "train.json")
BATCH = 64
N_IMAGES = 2048          # enough distinct batches; the data's content does not affect speed


def runner_for(model: str, **options) -> pretrain.Runner:
    cfg = pretrain.resolve(pretrain.Config(model=model, batch_size=BATCH, device="cpu", **options))
    return pretrain.Runner(cfg, pretrain.Dist())


# ============================================================================ the textbook loops
def dcgan_reference_step(gen, critic, opt_g, opt_d, batches, z_dim: int) -> int:
    """PyTorch DCGAN example: real pass, fake pass (detached), D step; G step on the same fake."""
    real = next(batches)[0]
    ones, zeros = torch.ones(len(real)), torch.zeros(len(real))
    critic.zero_grad()
    F.binary_cross_entropy_with_logits(critic(real), ones).backward()
    fake = gen(nets.sample_z(len(real), z_dim, "cpu"))
    F.binary_cross_entropy_with_logits(critic(fake.detach()), zeros).backward()
    opt_d.step()
    gen.zero_grad()
    F.binary_cross_entropy_with_logits(critic(fake), ones).backward()
    opt_g.step()
    return len(real)


def wgan_gp_reference_step(gen, critic, opt_g, opt_d, batches, z_dim: int, n_critic: int = 5,
                           gp_lambda: float = 10.0) -> int:
    """The usual WGAN-GP loop (gan_cifar.py ported to PyTorch): n_critic critic steps, then G."""
    for p in critic.parameters():
        p.requires_grad_(True)
    seen = 0
    for _ in range(n_critic):
        real = next(batches)[0]
        critic.zero_grad()
        with torch.no_grad():
            fake = gen(nets.sample_z(len(real), z_dim, "cpu"))
        alpha = torch.rand(len(real), 1, 1, 1)
        interp = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        d_interp = critic(interp)
        grads, = torch.autograd.grad(d_interp, interp, grad_outputs=torch.ones_like(d_interp), create_graph=True)
        penalty = ((grads.view(len(real), -1).norm(2, dim=1) - 1) ** 2).mean()
        loss = critic(fake).mean() - critic(real).mean() + gp_lambda * penalty
        loss.backward()
        opt_d.step()
        seen += len(real)
    for p in critic.parameters():
        p.requires_grad_(False)
    gen.zero_grad()
    (-critic(gen(nets.sample_z(BATCH, z_dim, "cpu"))).mean()).backward()
    opt_g.step()
    return seen


def forever(loader):
    while True:
        yield from loader


def reference_steps(model: str, images_uint8: torch.Tensor):
    """A step function of the textbook loop over the same nets and optimizer settings as replearn."""
    cfg = pretrain.resolve(pretrain.Config(model=model, batch_size=BATCH, device="cpu", precision="fp32",
                                           channels_last=False))
    torch.manual_seed(cfg.seed)
    gen, critic = zoo.build_models(cfg.arch, norm=cfg.norm, spectral_norm=cfg.spectral_norm,
                                    attention_res=cfg.attention_res, z_dim=cfg.z_dim, image_size=cfg.image_size,
                                    width=cfg.width, g_norm=cfg.g_norm)
    make = pretrain.OPTIMIZERS[cfg.optimizer]
    opt_g, opt_d = make(gen.parameters(), cfg.lr_g, cfg), make(critic.parameters(), cfg.lr_d, cfg)
    floats = images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()   # N x 3 x 32 x 32
    batches = forever(DataLoader(TensorDataset(floats), batch_size=BATCH, shuffle=True, drop_last=True))
    if cfg.loss == "wgan-gp":
        def step(n_critic: int = cfg.n_critic) -> int:
            return wgan_gp_reference_step(gen, critic, opt_g, opt_d, batches, cfg.z_dim, n_critic, cfg.gp_lambda)
        return step, lambda: step(1)         # warm-up: one critic and one generator update
    step = lambda: dcgan_reference_step(gen, critic, opt_g, opt_d, batches, cfg.z_dim)   # noqa: E731
    return step, step


def replearn_steps(model: str, images_uint8: torch.Tensor, **options):
    run = runner_for(model, **options)
    stream = pretrain.BatchStream(len(images_uint8), BATCH, 0, run.dist)

    def step() -> int:
        before = run.state.batches
        run.train_step(images_uint8, stream)
        return (run.state.batches - before) * BATCH

    def warm() -> None:                      # one critic and one generator update, as the reference's
        _, fake = pretrain.critic_update(run, images_uint8[stream.next()], keep_fake=run.cfg.n_critic == 1)
        pretrain.generator_update(run, fake)

    return step, warm, run.precision


# ============================================================================ timing
CONFIGS = {"reference": {}, "default": {}, "fp32": {"precision": "fp32"}, "compile": {"compile": True}}


def step_functions(model: str, config: str, images: torch.Tensor):
    if config == "reference":
        return (*reference_steps(model, images), "fp32")
    return replearn_steps(model, images, **CONFIGS[config])


def time_one(model: str, config: str, warmup: int, timed: int, count: bool = True) -> dict:
    """Build one configuration, warm it up (allocator, oneDNN kernels, compilation), time `timed`
    generator steps, then count one more step's FLOPs and bytes (not for compile: FlopCounterMode does
    not see inside a compiled graph; its maths is the default's). Runs in a fresh process (see `measure`)."""
    images = torch.randint(0, 256, (N_IMAGES, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    step, warm, precision = step_functions(model, config, images)
    t0 = time.perf_counter()
    for _ in range(warmup):
        warm()
    warm_s = time.perf_counter() - t0
    faults0, t0, seen = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter(), 0
    for _ in range(timed):
        seen += step()
    seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    out = {"images_per_second": seen / seconds, "seconds": seconds, "real_images": seen, "generator_steps": timed,
           "warmup_steps": warmup, "warmup_seconds": warm_s, "precision": precision,
           "channels_last": config != "reference", "page_faults_per_step": faults / timed}
    if count and config != "compile":
        counted = {}
        work = ceiling.count_work(lambda: counted.setdefault("images", step()))    # one generator step
        out["work_per_image"] = {k: v / counted["images"] for k, v in work.items()}
    return out


def in_fresh_process(model: str, config: str, warmup: int, timed: int, count: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--one", model, config, "--warmup", str(warmup), "--timed", str(timed)]
    cmd += [] if count else ["--no-count"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:   # a failure (say, of torch.compile) is reported as data
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {"error": (lines or ["no output"])[-1][:300], "where": lines[-4:-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(model: str, warmup: int, timed: int, rounds: int, with_compile: bool, limits: dict) -> dict:
    """reference, default and fp32 in `rounds` interleaved rounds, each timing in a fresh process;
    the median round counts. Why fresh processes: the textbook loop's speed depended on what ran
    before it in the same process (standalone it took ~200k page faults per step; after other
    configurations had grown the heap, far fewer, and it ran ~15% faster), so every configuration
    is timed from the same start, as a user running it alone would see it."""
    runs = {name: [] for name in ("reference", "default", "fp32")}
    for r in range(rounds):
        for name in runs:
            runs[name].append(in_fresh_process(model, name, warmup, timed, count=r == 0))   # count once
            print(f"{model:8s} round {r + 1} {name:9s} {runs[name][-1].get('images_per_second', float('nan')):8.1f} img/s",
                  flush=True)
    out = {}
    for name, results in runs.items():
        if any("error" in res for res in results):
            raise RuntimeError(f"{model} {name} failed: {next(res for res in results if 'error' in res)}")
        ranked = sorted(results, key=lambda res: res["images_per_second"])
        out[name] = {**ranked[len(ranked) // 2], "rounds": rounds, "work_per_image": results[0]["work_per_image"],
                     "rounds_images_per_second": [res["images_per_second"] for res in results]}
    if with_compile:
        out["compile"] = in_fresh_process(model, "compile", max(warmup, 2), timed)
    for name in ("default", "fp32", "compile"):
        if "images_per_second" in out.get(name, {}):
            out[name]["speedup_vs_reference"] = out[name]["images_per_second"] / out["reference"]["images_per_second"]
    if "images_per_second" in out.get("compile", {}):
        out["compile"]["work_per_image"] = out["default"]["work_per_image"]     # same maths, counted eagerly
    for row in out.values():
        if "work_per_image" in row:
            row["ceiling"] = against_ceiling(row, limits)
    return out


def against_ceiling(row: dict, limits: dict) -> dict:
    """Achieved FLOP/s and bytes/s of one configuration against this machine's ceiling."""
    rate, work = row["images_per_second"], row["work_per_image"]
    return ceiling.fraction(rate * work["flops"], rate * work["bytes"], row["precision"], limits)


def summarise(results: dict) -> dict:
    """Headline figures are the weaker of the two models (the targets must hold for both)."""
    per = {m: {k: r[k]["images_per_second"] for k in ("reference", "default", "fp32", "compile")
               if "images_per_second" in r.get(k, {})} for m, r in results.items()}
    speed = {m: r["default"]["speedup_vs_reference"] for m, r in results.items()}
    speed32 = {m: r["fp32"]["speedup_vs_reference"] for m, r in results.items()}
    ceil = {m: {k: {f: r[k]["ceiling"][f] for f in ("fraction_of_ceiling", "gflops", "precision", "bound")}
                for k in ("reference", "default", "fp32", "compile") if "ceiling" in r.get(k, {})}
            for m, r in results.items()}
    return {"speedup_vs_reference": min(speed.values()), "speedup_fp32": min(speed32.values()),
            # the default loop of each model against the machine's matmul rate at its precision
            "fraction_of_ceiling": {m: r["default"]["ceiling"]["fraction_of_ceiling"] for m, r in results.items()},
            "verdict": {m: r["default"]["ceiling"]["verdict"] for m, r in results.items()},
            "gflop_per_image": {m: r["default"]["work_per_image"]["flops"] / 1e9 for m, r in results.items()},
            "ceiling_per_config": ceil,
            "speedup_vs_reference_per_model": speed, "speedup_fp32_per_model": speed32,
            "images_per_second": per, "targets": {"speedup_vs_reference": 2.5, "speedup_fp32": 1.1},
            "machine": hardware(), "threads": torch.get_num_threads(), "batch_size": BATCH}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dcgan-steps", type=int, default=3, help="timed generator steps per round for DCGAN")
    parser.add_argument("--gp-steps", type=int, default=1, help="timed generator steps per round for WGAN-GP (5 critic each)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median round is reported")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CONFIG"), help="time one configuration, print JSON")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=3)
    parser.add_argument("--no-count", action="store_true", help="--one: skip the FLOP and byte count")
    parser.add_argument("--quick", action="store_true",
                        help="1 round, 1 timed step, 1 warm-up step, no compile; writes train_quick.json")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(time_one(*args.one, args.warmup, args.timed, not args.no_count)))
        return OUT
    if args.quick:
        args.rounds, args.dcgan_steps, args.gp_steps, args.warmup, args.no_compile = 1, 1, 1, 1, True
    out_path = ceiling.result_path(OUT.with_name("train_quick.json")) if args.quick else OUT
    began = time.time()
    limits = ceiling.measure(**(ceiling.QUICK if args.quick else {}))      # this machine's, in this run
    results = {"dcgan": measure("dcgan", args.warmup, args.dcgan_steps, args.rounds, not args.no_compile, limits),
               "wgan-gp": measure("wgan-gp", args.warmup, args.gp_steps, args.rounds, not args.no_compile, limits)}
    summary = {**summarise(results), "ceiling": ceiling.summary(limits)}
    atomic_write_json(out_path, {"summary": summary, "results": results, "seconds": time.time() - began,
                            "ceiling": limits, "args": vars(args), "provenance": provenance(),
                            "note": "every critic step consumes one batch of real images; "
                                    "reference = textbook fp32 NCHW DataLoader loop, same nets; "
                                    "each timing in a fresh process, median of interleaved rounds"})
    print({k: summary[k] for k in ("speedup_vs_reference", "speedup_fp32", "fraction_of_ceiling", "machine")})
    return out_path


if __name__ == "__main__":
    main()
