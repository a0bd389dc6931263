"""The gradient penalty's cheaper forward pass (replearn.models.penalty) gives exactly the penalty
gradients of PyTorch's standard double backward, for every critic it accepts, and is refused
where it would not be exact."""
from __future__ import annotations

import copy

import pytest
import torch

from replearn.core.utils import cpu_vector_units
from replearn.models import losses, nets, penalty, zoo


def penalty_grads(critic: torch.nn.Module, real, fake, alpha, fast: bool, bf16: bool = False) -> dict:
    """Parameter gradients of the penalty alone; a parameter with no gradient counts as zeros."""
    critic = copy.deepcopy(critic)        # spectral norm's power iteration must start alike
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        interp = losses.interpolate(real, fake, alpha)
        d_interp = losses.penalty_pass(critic, interp) if fast else critic(interp)
        gp = losses.gradient_penalty(critic, real, fake, d_interp=d_interp, interp=interp)
    gp.backward()
    return {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in critic.named_parameters()}


def draws(seed: int = 0, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    real, fake = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    return (real.contiguous(memory_format=torch.channels_last), fake.contiguous(memory_format=torch.channels_last),
            torch.rand(n, generator=g))


@pytest.mark.parametrize("spectral", [False, True], ids=["plain", "sn"])
@pytest.mark.parametrize("arch", sorted(zoo.ARCHS))
def test_fast_penalty_gradients_equal_the_double_backward(arch, spectral):
    torch.manual_seed(0)
    _, critic = zoo.build_models(arch, norm="none", spectral_norm=spectral, width=0.125)
    critic = critic.to(memory_format=torch.channels_last)
    assert penalty.supports(critic)
    real, fake, alpha = draws()
    fast, standard = (penalty_grads(critic, real, fake, alpha, f) for f in (True, False))
    assert any(g.abs().sum() > 0 for g in standard.values())
    for name, g in standard.items():
        assert torch.allclose(fast[name], g, rtol=1e-4, atol=1e-7 * g.abs().max().clamp(min=1)), name


def test_fast_penalty_under_bf16_tracks_the_float32_gradients():
    """Under autocast the fast path rounds to bf16 precision (6% of the float32 gradients here, as the
    standard path on AVX512-BF16 CPUs). It is checked against float32, not against the standard path under
    autocast: with oneDNN's AMX kernels that one strayed by 59% (benchmarks/results/notes.md, stop 51)."""
    torch.manual_seed(0)
    _, critic = zoo.build_models("dcgan", norm="none", width=0.25)
    real, fake, alpha = draws(1)
    grads = lambda fast, bf16: torch.cat([g.flatten() for g in   # noqa: E731
                                          penalty_grads(critic, real, fake, alpha, fast, bf16).values()])
    fast, reference = grads(True, True), grads(False, False)
    assert fast.dtype == torch.float32
    assert (fast - reference).norm() < 0.1 * reference.norm()


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_standard_penalty_of_a_small_batch_under_bf16_tracks_the_float32_gradients(norm):
    """Norm-layer critics take the standard double backward. At 6 samples its weight terms are bf16
    convolutions with 6 input channels and 8x8-32x32 kernels, which oneDNN's AMX kernels got wrong (30-60% off
    float32 without the float32 fallback, penalty.bf16_conv_unsafe); elsewhere bf16 rounding keeps them near."""
    torch.manual_seed(0)
    _, critic = zoo.build_models("dcgan", norm=norm, width=0.25)
    critic = critic.to(memory_format=torch.channels_last)
    assert not penalty.supports(critic)
    real, fake, alpha = draws(1)
    grads = lambda bf16: torch.cat([g.flatten() for g in   # noqa: E731
                                    penalty_grads(critic, real, fake, alpha, True, bf16).values()])
    guarded, reference = grads(True), grads(False)
    assert (guarded - reference).norm() < 0.15 * reference.norm()


def test_the_float32_fallback_is_asked_for_only_where_the_bf16_convolution_is_wrong():
    cpu = torch.device("cpu")
    with torch.autocast("cpu", torch.bfloat16):
        assert penalty.bf16_conv_unsafe(6, cpu) == (cpu_vector_units() == "AMX-BF16")
        assert not penalty.bf16_conv_unsafe(64, cpu)
    assert not penalty.bf16_conv_unsafe(6, cpu)          # float32: nothing to guard


@pytest.mark.parametrize("options", [dict(norm="batch"), dict(norm="layer"), dict(norm="none", attention_res=16)],
                         ids=["batch", "layer", "attention"])
def test_critics_whose_backward_reads_activations_keep_the_standard_path(options):
    """Norm layers and self-attention make the input gradient depend on forward values."""
    _, critic = zoo.build_models("dcgan", width=0.125, **options)
    assert not penalty.supports(critic)
    assert penalty.supports(zoo.build_models("dcgan", width=0.125, norm="none")[1])


def test_a_subclass_with_its_own_forward_is_not_trusted_by_inheritance():
    class Squared(nets.ConvCritic):
        def forward(self, x):
            return super().forward(x) ** 2

    assert penalty.supports(nets.ConvCritic(norm="none"))
    assert not penalty.supports(Squared(norm="none"))


def test_strided_and_biased_convs_return_the_input_shape():
    """conv_transpose2d's output_padding restores odd and even input sizes alike."""
    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
    for size in (7, 8):
        x = torch.randn(2, 3, size, size, requires_grad=True)
        with penalty.input_gradient_pass():
            y = conv(x)
        grad_fast, = torch.autograd.grad(y.sum(), x)
        grad_std, = torch.autograd.grad(conv(x).sum(), x)
        assert grad_fast.shape == x.shape and torch.allclose(grad_fast, grad_std, atol=1e-6)
