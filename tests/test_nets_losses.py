"""Nets and losses: the 28672 layout, registries, and the gradient penalty against hand-computed cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from replearn.models import losses, nets, zoo
from replearn.core.config import ConfigError


def test_dcgan_critic_matches_protocol_layout():
    _, critic = zoo.build_models("dcgan")
    convs = [m for m in critic.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 128, 256, 256, 512, 512]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2, 1, 2]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    bns = [m for m in critic.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 5                      # BN on layers 2-6, not 1
    assert critic.head.in_features == 8192    # 512 x 4 x 4 -> 1
    layers = critic.feature_layers()
    assert [d for _, d in layers] == [16 * c for c in (128, 128, 256, 256, 512, 512)]
    critic.eval()
    with torch.no_grad():
        feats = nets.pooled_features(critic, torch.zeros(2, 3, 32, 32).uniform_(-1, 1))
    assert feats.shape == (2, 28672)


def test_pooled_features_are_per_layer_maxpools_in_order():
    torch.manual_seed(0)
    _, critic = zoo.build_models("dcgan", width=0.125)
    critic.eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        feats = nets.pooled_features(critic, x)
        maps = critic.features(x)
    offset = 0
    for _, fmap in maps:
        pooled = torch.nn.functional.adaptive_max_pool2d(fmap, 4).flatten(1)
        assert torch.equal(feats[:, offset:offset + pooled.shape[1]], pooled)
        offset += pooled.shape[1]
    assert offset == feats.shape[1]


@pytest.mark.parametrize("arch", ["dcgan", "resnet", "dense", "mlp"])
def test_spectral_norm_at_initialisation_divides_by_the_initialised_weights_norm(arch):
    # the step-0 control is extracted in eval mode, where spectral norm uses its stored u, v: they must
    # belong to the DCGAN-initialised weights (once they were the constructor's: layers gained 9-104x)
    torch.manual_seed(0)
    _, critic = zoo.build_models(arch, norm="none", spectral_norm=True, width=0.25)
    critic.eval()
    normed = [m for m in critic.modules() if hasattr(m, "parametrizations")]
    assert normed
    for m in normed:
        top = float(torch.linalg.svdvals(m.weight.detach().flatten(1))[0])     # the reference: an SVD
        assert 0.99 < top < 1.1, (type(m).__name__, top)


def test_to_unit_maps_uint8_to_minus_one_one():
    img = torch.tensor([[[[0, 255, 127]]]], dtype=torch.uint8)   # 1 x 1 x 1 x 3
    x = nets.to_unit(img, "cpu")
    assert x.shape == (1, 3, 1, 1)
    assert torch.allclose(x.flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))


def test_unknown_names_list_the_choices():
    with pytest.raises(ConfigError, match="choose from: .*dcgan"):
        zoo.build_models("nope")
    with pytest.raises(ConfigError, match="wgan-gp"):
        losses.build_loss("nope", 1, 10.0, 0.01)


def test_self_attention_starts_as_identity():
    block = nets.SelfAttention(16)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), x)          # gamma = 0 at the start
    block.gamma.data.fill_(0.5)
    assert not torch.allclose(block(x), x)


class Linear(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x.flatten(1) * self.w).sum(1)


def test_gradient_penalty_linear_critic():
    """D(x) = w.x has gradient w everywhere: GP = (||w|| - 1)^2 exactly."""
    w = torch.full((3 * 4 * 4,), 0.5)
    critic = Linear(w)
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    gp = losses.gradient_penalty(critic, real, fake, torch.rand(5))
    assert gp.item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-6)


def test_gradient_penalty_quadratic_critic_uses_per_sample_alpha():
    """D(x) = 0.5 ||x||^2 has gradient x_hat: GP = mean (||a r + (1 - a) f|| - 1)^2."""
    class Quadratic(nn.Module):
        def forward(self, x):
            return 0.5 * x.flatten(1).pow(2).sum(1)

    real, fake = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    alpha = torch.rand(6, 1, 1, 1)
    gp = losses.gradient_penalty(Quadratic(), real, fake, alpha)
    x_hat = alpha * real + (1 - alpha) * fake
    expected = ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-5)


def test_wgan_gp_single_pass_equals_separate_passes():
    """Without BatchNorm one pass over real|fake|interp gives the same loss as three passes."""
    torch.manual_seed(0)
    _, critic = zoo.build_models("dcgan", norm="layer", width=0.125)
    real, fake = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    loss = losses.build_loss("wgan-gp", 5, 10.0, 0.01)
    alpha = torch.rand(4, 1, 1, 1)
    joint, _ = loss.critic_loss(critic, real, fake, alpha)
    interp = losses.interpolate(real, fake, alpha)
    d_interp = critic(interp)
    separate = (critic(fake).mean() - critic(real).mean()
                + 10.0 * losses.gradient_penalty(critic, real, fake, d_interp=d_interp, interp=interp))
    assert joint.item() == pytest.approx(separate.item(), rel=1e-4, abs=1e-5)


def test_weight_clipping_and_schedule():
    loss = losses.build_loss("wgan", 5, 10.0, 0.01)
    critic = nn.Linear(4, 1)
    nn.init.constant_(critic.weight, 3.0)
    loss.after_critic_step(critic)
    assert critic.weight.abs().max().item() == pytest.approx(0.01)
    assert [loss.critic_steps(s) for s in (0, 24, 25, 500, 501)] == [100, 100, 5, 100, 5]
