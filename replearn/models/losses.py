"""GAN objectives and their registry.

A loss knows how many critic steps to take before each generator step, computes the critic and
generator losses, and what to do after a critic step (weight clipping for WGAN). Each returns
`(loss, stats)` where stats are floats for the log. `defaults` carries the reference code's
hyperparameters (docs/protocol.md s.1), applied where the user did not set a key.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import penalty
from ..core.utils import lookup, make_registry

LOSSES, register_loss = make_registry("loss")


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def critic_scores(critic: nn.Module, *batches: torch.Tensor) -> list[torch.Tensor]:
    """Critic scores for several batches: one pass over all of them unless the critic has
    BatchNorm, whose batch statistics must not mix real and fake (the reference DCGAN code
    runs them separately)."""
    if has_batchnorm(critic):
        return [critic(b) for b in batches]
    scores = critic(torch.cat(batches))
    return list(scores.split([len(b) for b in batches]))


class GanLoss:
    defaults: dict = {}

    def __init__(self, n_critic: int, gp_lambda: float = 10.0, clip: float = 0.01):
        self.n_critic, self.gp_lambda, self.clip = n_critic, gp_lambda, clip

    def critic_steps(self, gen_step: int) -> int:
        return self.n_critic

    def critic_loss(self, critic, real, fake, alpha=None) -> tuple[torch.Tensor, dict]:
        """`alpha` (N x 1 x 1 x 1 in [0, 1)) is drawn by the trainer so that a run split over
        processes draws exactly what a single process would; losses without a penalty ignore it."""
        raise NotImplementedError

    def generator_loss(self, critic, fake) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_critic_step(self, critic: nn.Module) -> None:
        pass


@register_loss("dcgan")
class DcganLoss(GanLoss):
    """Binary cross-entropy; the generator maximises log D(G(z)) (non-saturating)."""
    defaults = dict(n_critic=1, batch_size=128, optimizer="adam", lr_g=2e-4, lr_d=2e-4, beta1=0.5, beta2=0.999,
                    norm="batch")

    def critic_loss(self, critic, real, fake, alpha=None):
        d_real, d_fake = critic_scores(critic, real, fake)
        loss = (F.binary_cross_entropy_with_logits(d_real.float(), torch.ones_like(d_real, dtype=torch.float32))
                + F.binary_cross_entropy_with_logits(d_fake.float(), torch.zeros_like(d_fake, dtype=torch.float32)))
        return loss, {"d_loss": loss.item(), "d_real": torch.sigmoid(d_real.float()).mean().item(),
                      "d_fake": torch.sigmoid(d_fake.float()).mean().item()}

    def generator_loss(self, critic, fake):
        d_fake = critic(fake).float()
        loss = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
        return loss, {"g_loss": loss.item()}


def wasserstein_terms(d_real: torch.Tensor, d_fake: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Critic loss E[D(fake)] - E[D(real)], and the Wasserstein estimate E[D(real)] - E[D(fake)]."""
    gap = d_real.float().mean() - d_fake.float().mean()
    return -gap, gap.item()


def gradient_penalty(critic, real, fake, alpha=None, d_interp: torch.Tensor | None = None,
                     interp: torch.Tensor | None = None) -> torch.Tensor:
    """E[(||grad_x D(x_hat)||_2 - 1)^2], x_hat = a real + (1 - a) fake, one a ~ U(0, 1) per sample."""
    if interp is None:
        interp = interpolate(real, fake, alpha)
        d_interp = penalty_pass(critic, interp)
    grads, = torch.autograd.grad(d_interp.float().sum(), interp, create_graph=True)
    norms = grads.float().flatten(1).norm(2, dim=1)     # N, in fp32 even under autocast
    return ((norms - 1.0) ** 2).mean()


def penalty_pass(critic: nn.Module, interp: torch.Tensor) -> torch.Tensor:
    """D(x_hat) for the penalty, through `penalty.input_gradient_pass` where that is exact, and in float32
    where the standard double backward would hit oneDNN's wrong AMX bf16 convolution. Always
    eager: AOTAutograd (torch.compile) cannot double-backward, so a compiled critic runs uncompiled here."""
    critic = getattr(critic, "_orig_mod", critic)
    if penalty.supports(critic):
        with penalty.input_gradient_pass():
            return critic(interp)
    if penalty.bf16_conv_unsafe(interp.shape[0], interp.device):
        with torch.autocast("cpu", enabled=False):
            return critic(interp)
    return critic(interp)


def interpolate(real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
    if alpha is None:
        alpha = torch.rand(real.shape[0], 1, 1, 1)
    alpha = alpha.view(-1, 1, 1, 1).to(real.device, real.dtype)
    return (alpha * real + (1 - alpha) * fake).detach().requires_grad_(True)


@register_loss("wgan-gp")
class WganGpLoss(GanLoss):
    """WGAN with gradient penalty (Gulrajani et al.), lambda 10, 5 critic steps, per-sample alpha."""
    # norm none: the critic of igul222's gan_cifar.py has no normalisation (norm=layer is the usual
    # substitute for BN when one is wanted; its double backward is ~2x slower on CPU)
    defaults = dict(n_critic=5, batch_size=64, optimizer="adam", lr_g=1e-4, lr_d=1e-4, beta1=0.5, beta2=0.9,
                    norm="none")

    def critic_loss(self, critic, real, fake, alpha=None):
        interp = interpolate(real, fake, alpha)
        # real and fake share one pass; the interpolates get their own, because the penalty's double
        # backward runs through every sample of the pass it is in: inside one real|fake|interp pass it
        # cost 3x the work (benchmarks/train.py, WGAN-GP vs the textbook loop: fp32 0.68x -> 1.13x, bf16 1.21x -> 2.20x).
        # penalty_pass skips the double backward's wasted work (replearn/models/penalty.py; critic step at batch 64
        # on this CPU: bf16 1.39 -> 0.97 s, fp32 2.87 -> 1.89 s)
        d_real, d_fake = critic_scores(critic, real, fake)
        d_interp = penalty_pass(critic, interp)
        base, w_est = wasserstein_terms(d_real, d_fake)
        gp = gradient_penalty(critic, real, fake, d_interp=d_interp, interp=interp)
        loss = base + self.gp_lambda * gp
        return loss, {"d_loss": loss.item(), "wasserstein": w_est, "gp": gp.item()}

    def generator_loss(self, critic, fake):
        loss = -critic(fake).float().mean()
        return loss, {"g_loss": loss.item()}


@register_loss("wgan")
class WganClipLoss(WganGpLoss):
    """WGAN with weight clipping (Arjovsky et al.): RMSprop 5e-5, clip 0.01, 5 critic steps,
    100 for the first 25 generator steps and every 500th."""
    defaults = dict(n_critic=5, batch_size=64, optimizer="rmsprop", lr_g=5e-5, lr_d=5e-5, norm="batch")

    def critic_steps(self, gen_step: int) -> int:
        return 100 if gen_step < 25 or gen_step % 500 == 0 else self.n_critic

    def critic_loss(self, critic, real, fake, alpha=None):
        d_real, d_fake = critic_scores(critic, real, fake)
        loss, w_est = wasserstein_terms(d_real, d_fake)
        return loss, {"d_loss": loss.item(), "wasserstein": w_est}

    @torch.no_grad()
    def after_critic_step(self, critic):
        for p in critic.parameters():
            p.clamp_(-self.clip, self.clip)


@register_loss("wgan-no-warmup")
class WganClipNoWarmupLoss(WganClipLoss):
    """WGAN with weight clipping, `n_critic` critic steps at every generator step: Arjovsky's
    schedule without its 100-step warm-up, which alone is 2,500 critic steps -- the whole of a
    few-minute CPU budget (the studies' smoke and tiny presets)."""

    def critic_steps(self, gen_step: int) -> int:
        return self.n_critic


@register_loss("hinge")
class HingeLoss(GanLoss):
    """Hinge loss, the usual partner of spectral norm (Miyato et al.; SAGAN)."""
    defaults = dict(n_critic=1, batch_size=64, optimizer="adam", lr_g=1e-4, lr_d=4e-4, beta1=0.0, beta2=0.9,
                    norm="none", spectral_norm=True)

    def critic_loss(self, critic, real, fake, alpha=None):
        d_real, d_fake = critic_scores(critic, real, fake)
        loss = F.relu(1 - d_real.float()).mean() + F.relu(1 + d_fake.float()).mean()
        return loss, {"d_loss": loss.item(), "wasserstein": (d_real.float().mean() - d_fake.float().mean()).item()}

    def generator_loss(self, critic, fake):
        loss = -critic(fake).float().mean()
        return loss, {"g_loss": loss.item()}


def build_loss(name: str, n_critic: int, gp_lambda: float, clip: float) -> GanLoss:
    return lookup(LOSSES, name, "loss")(n_critic=n_critic, gp_lambda=gp_lambda, clip=clip)
