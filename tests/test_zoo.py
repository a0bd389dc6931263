"""The GAN zoo: every recipe and architecture trains one step; bf16 tracks fp32; the fp32 step
equals a textbook WGAN-GP step."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import random_images
from replearn.models import losses, nets, zoo
from replearn.train import pretrain
from replearn.models.recipes import RECIPES

# small nets and batches: the whole file runs in well under a minute on 2 cores
TINY = dict(width=0.125, batch_size=4, z_dim=32, precision="fp32", device="cpu")
# an attention resolution that exists in each arch (mlp has no spatial positions)
ATTENTION_AT = {"dcgan": 16, "mlp": 0, "resnet": 8, "dense": 16}
# pooled feature dims at width 1, as documented in zoo.py
FEATURE_DIMS = {"dcgan": 28672, "mlp": 1536, "resnet": 8192, "dense": 15360}

CASES = ([pytest.param(dict(model=name), id=name) for name in sorted(RECIPES)]
         + [pytest.param(dict(model="wgan-gp", arch=a, norm="layer", spectral_norm=True, attention_res=r),
                         id=f"{a}-layer-sn-attn{r}") for a, r in ATTENTION_AT.items()]
         + [pytest.param(dict(model="dcgan", arch=a, norm="batch", g_norm="layer"), id=f"{a}-batch")
            for a in ATTENTION_AT])


def tiny_runner(**options) -> pretrain.Runner:
    cfg = pretrain.resolve(pretrain.Config(**{**TINY, **options}))
    return pretrain.Runner(cfg, pretrain.Dist())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(random_images(32, seed=2))          # 32 x 32 x 32 x 3 uint8


def assert_all_gradients(net: torch.nn.Module, label: str) -> None:
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{label}.{name} got no gradient"
        assert torch.isfinite(p.grad).all() and torch.isfinite(p).all(), f"{label}.{name} is not finite"


def test_the_walk_covers_every_architecture():
    assert set(ATTENTION_AT) == set(zoo.ARCHS) == set(FEATURE_DIMS)


@pytest.mark.parametrize("options", CASES)
def test_every_family_takes_a_training_step(options, images):
    """Build, one generator step (with its critic steps), gradients everywhere, no NaN, features."""
    run = tiny_runner(**options)
    stream = pretrain.BatchStream(len(images), run.cfg.batch_size, 0, run.dist)
    stats = run.train_step(images, stream)
    assert stats and all(math.isfinite(v) for v in stats.values()), stats
    # the critic's gradients survive the generator update (its parameters are frozen there) and the
    # generator's are untouched by the critic update (fakes made under no_grad): both are checkable now
    assert_all_gradients(run.state.critic, "critic")
    assert_all_gradients(run.state.gen, "generator")
    critic = run.state.critic.eval()
    with torch.no_grad():
        feats = nets.pooled_features(critic, nets.to_unit(images[:3], "cpu"))
    assert feats.shape == (3, sum(dim for _, dim in critic.feature_layers()))
    assert torch.isfinite(feats).all()


@pytest.mark.parametrize("arch", sorted(FEATURE_DIMS))
def test_feature_sizes_match_the_documented_table(arch):
    _, critic = zoo.build_models(arch, norm="layer")            # width 1: the documented size
    assert sum(dim for _, dim in critic.feature_layers()) == FEATURE_DIMS[arch]


def test_bf16_tracks_fp32(images):
    """Same seed, 4 WGAN-GP generator steps (8 critic steps): under bf16 autocast every logged loss
    stays within 0.1 + 10% of fp32's and the critic's parameter change within 25% of its norm
    (Adam's normalised first steps amplify rounding, so the change, not the weights, is compared)."""
    options = dict(model="wgan-gp", width=0.25, batch_size=8, n_critic=2, z_dim=64)
    logs, params = {}, {}
    for precision in ("fp32", "bf16"):
        run = tiny_runner(**{**options, "precision": precision})
        start = torch.cat([p.detach().flatten().clone() for p in run.state.critic.parameters()])
        stream = pretrain.BatchStream(len(images), 8, 0, run.dist)
        logs[precision] = [run.train_step(images, stream) for _ in range(4)]
        params[precision] = torch.cat([p.detach().flatten() for p in run.state.critic.parameters()])
    for fp32, bf16 in zip(logs["fp32"], logs["bf16"]):
        for key in fp32:
            assert bf16[key] == pytest.approx(fp32[key], rel=0.1, abs=0.1), (key, fp32, bf16)
    change = params["fp32"] - start
    assert (params["bf16"] - params["fp32"]).norm() < 0.25 * change.norm()


def textbook_wgan_gp_step(critic, gen, real_uint8, z, alpha, lr, betas, gp_lambda=10.0):
    """The usual loop: float32, contiguous NCHW, three separate critic passes, autograd.grad on interpolates."""
    opt = torch.optim.Adam(critic.parameters(), lr=lr, betas=betas)
    real = (real_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()   # N x 3 x 32 x 32, NCHW
    with torch.no_grad():
        fake = gen(z)
    interp = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    d_interp = critic(interp)
    grads, = torch.autograd.grad(d_interp, interp, grad_outputs=torch.ones_like(d_interp), create_graph=True)
    penalty = ((grads.view(len(grads), -1).norm(2, dim=1) - 1) ** 2).mean()
    loss = critic(fake).mean() - critic(real).mean() + gp_lambda * penalty
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_fp32_step_equals_the_textbook_step(images):
    """One WGAN-GP critic step of replearn's fp32 path (channels_last, one pass over real|fake, the
    penalty through penalty.input_gradient_pass) gives the gradients and parameters of the textbook
    step, from the same weights and draws."""
    run = tiny_runner(model="wgan-gp", width=0.25, batch_size=8, z_dim=64, channels_last=True)
    critic, gen = copy.deepcopy(run.state.critic), copy.deepcopy(run.state.gen)
    critic, gen = critic.to(memory_format=torch.contiguous_format), gen.to(memory_format=torch.contiguous_format)
    draws = torch.Generator().set_state(run.state.rng.get_state())
    z = nets.sample_z(8, 64, "cpu", draws)                       # the trainer draws z, then alpha
    alpha = torch.rand(8, 1, 1, 1, generator=draws)
    real = images[:8]
    pretrain.critic_update(run, real)
    textbook_wgan_gp_step(critic, gen, real, z, alpha, run.cfg.lr_d, (run.cfg.beta1, run.cfg.beta2))
    ours, theirs = dict(run.state.critic.named_parameters()), dict(critic.named_parameters())
    for name, p in theirs.items():
        assert torch.allclose(ours[name].grad, p.grad, rtol=1e-3, atol=1e-6), name
        # Adam's first step is ~lr * sign(grad): grads equal to ~1e-7 leave the weights equal to ~1e-6
        assert torch.allclose(ours[name], p, rtol=0, atol=2e-6), name
    assert losses.has_batchnorm(critic) is False


@pytest.mark.parametrize("model, forwards", [("dcgan", 1), ("wgan-gp", 3)])
def test_generator_forwards_per_iteration(model, forwards, images):
    """With one critic step per generator step the generator step reuses that step's fakes (as the
    PyTorch DCGAN example): one generator forward per iteration; with n_critic=2, three."""
    run = tiny_runner(model=model, n_critic=1 if model == "dcgan" else 2, g_norm="batch")
    bn = next(m for m in run.state.gen.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stream = pretrain.BatchStream(len(images), run.cfg.batch_size, 0, run.dist)
    before = int(bn.num_batches_tracked)
    run.train_step(images, stream)
    assert int(bn.num_batches_tracked) - before == forwards


@pytest.mark.slow
def test_compiled_wgan_gp_trains_like_eager(images):
    """torch.compile cannot double-backward: the penalty pass runs the critic uncompiled, the rest compiled."""
    stats = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        run = tiny_runner(model="wgan-gp", n_critic=1, compile=compiled)
        stream = pretrain.BatchStream(len(images), run.cfg.batch_size, 0, run.dist)
        stats[compiled] = run.train_step(images, stream)
    for key, value in stats[False].items():
        assert stats[True][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
