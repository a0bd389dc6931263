"""A cheaper forward pass for the gradient penalty, exact for piecewise-linear critics.

The penalty E[(||grad_x D(x_hat)||_2 - 1)^2] reaches the critic's parameters only through the
input gradient grad_x D, i.e. through the *backward* graph of the pass over x_hat. For a critic
built from convolutions, linear layers, (Leaky)ReLU, average pooling, sums and concatenations,
that backward graph depends on the forward activations only through the activation masks,
whose derivative is zero almost everywhere. PyTorch does not know this and, under
`create_graph=True`, wastes work twice (measured on the DCGAN critic, CPU, batch 64):

* `leaky_relu_backward`'s derivative w.r.t. its saved input is `zeros_like`, and autograd then
  runs a full backward of those zeros through the forward pass;
* the double backward of a convolution computes the weight term with slow transposed-batch
  convolutions instead of the ordinary weight-gradient kernel.

Inside `input_gradient_pass()`, `conv2d` becomes a function whose backward is the transposed
convolution of the upstream gradient with the weight (differentiable in both, so the double
backward uses ordinary kernels), and (Leaky)ReLU becomes one whose backward multiplies by a
mask read from a detached copy of its output. Neither returns a gradient for the forward path's
parameters: none is needed, because nothing in the input gradient depends on the forward
activations except through the masks. Critics with normalisation layers or self-attention
(whose backward does depend on forward values) keep the standard path: `supports()` checks the
modules. tests/test_penalty.py checks that both paths give the same parameter gradients.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from ..core.utils import cpu_has_amx

# Leaf modules whose forward is linear or piecewise linear in the activations; containers
# (Sequential, ModuleList) just compose. Spectral norm only reparametrises weights.
PIECEWISE_LINEAR = (nn.Conv2d, nn.Linear, nn.LeakyReLU, nn.ReLU, nn.Identity, nn.AvgPool2d, nn.Flatten,
                    nn.Unflatten, nn.Sequential, nn.ModuleList, nn.ModuleDict, parametrize.ParametrizationList)


def piecewise_linear(cls: type) -> type:
    """Class decorator: this module's own forward uses only piecewise-linear ops on activations
    (conv, linear, relu, leaky relu, avg pool, +, cat, reshapes, means); its children are checked apart."""
    cls.piecewise_linear_forward = True
    return cls


def supports(critic: nn.Module) -> bool:
    """Whether `input_gradient_pass` gives the exact penalty gradients for this critic."""
    critic = getattr(critic, "module", critic)          # DistributedDataParallel wrapper
    for module in critic.modules():
        # vars(): a subclass with its own forward must be vetted (and decorated) itself
        if isinstance(module, PIECEWISE_LINEAR) or vars(type(module)).get("piecewise_linear_forward", False):
            continue
        if type(module).__name__ == "_SpectralNorm":      # acts on the weight only
            continue
        return False
    return True


def bf16_conv_unsafe(batch: int, device: torch.device) -> bool:
    """Whether the standard double backward of a penalty pass over `batch` samples would run oneDNN's AMX
    bf16 convolution where it returns garbage, so that the pass must run in float32.

    That convolution is wrong (relative error ~1.1 against float32, where 0.003 is bf16's rounding) for kernels
    of 8x8 and more when the input channels are even and under 16 (benchmarks/results/notes.md, stop 52:
    torch 2.14.1, Intel AMX; AVX512-BF16 without AMX is fine). Ordinary critics never run such a kernel, but the
    weight term of a convolution's double backward is one: its kernel is the layer's activation map and its
    input channels are the batch. A batch under 16 (a small `batch_size`, a per-process share under torchrun,
    the tests) sent the penalty gradients of norm-layer critics 30-60% off. The fast path
    (`input_gradient_pass`) runs no such convolution."""
    return (device.type == "cpu" and batch < 16 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and cpu_has_amx())


def _transposed_padding(in_size: int, out_size: int, stride: int, padding: int, dilation: int, kernel: int) -> int:
    """output_padding that makes conv_transpose2d return the conv's input size exactly."""
    return in_size - ((out_size - 1) * stride - 2 * padding + dilation * (kernel - 1) + 1)


class _InputGradConv2d(torch.autograd.Function):
    """conv2d without bias whose backward returns only the input gradient, as conv_transpose2d."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):
        y = F.conv2d(x, weight, None, stride, padding, dilation, groups)   # autocast applies here
        ctx.save_for_backward(weight)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.in_shape, ctx.x_dtype, ctx.y_dtype = x.shape, x.dtype, y.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        extra = tuple(_transposed_padding(ctx.in_shape[d], grad_y.shape[d], stride[i], padding[i], dilation[i],
                                          weight.shape[d]) for i, d in enumerate((2, 3)))
        # the cast is recorded, so the double backward reaches the fp32 weight under autocast too
        grad_x = F.conv_transpose2d(grad_y.to(ctx.y_dtype), weight.to(ctx.y_dtype), None, stride, padding, extra,
                                    groups, dilation)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None


class _ConstantMaskRelu(torch.autograd.Function):
    """leaky_relu (slope 0: relu) whose backward treats the activation mask as a constant."""

    @staticmethod
    def forward(ctx, x, slope):
        y = F.leaky_relu(x, slope)
        ctx.save_for_backward(y)
        ctx.slope = slope
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, = ctx.saved_tensors
        # y detached: its mask has zero derivative, and a graph edge would make autograd
        # push zeros through the whole forward pass
        return torch.ops.aten.leaky_relu_backward(grad_y, y.detach(), ctx.slope, True), None


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    y = _InputGradConv2d.apply(x, weight, _pair(stride), _pair(padding), _pair(dilation), groups)
    # the bias has no effect on the input gradient; adding it here keeps it out of the custom backward
    return y if bias is None else y + bias.to(y.dtype).view(1, -1, 1, 1)


def _leaky_relu(x, negative_slope=0.01, inplace=False):
    return _ConstantMaskRelu.apply(x, negative_slope)


def _relu(x, inplace=False):
    return _ConstantMaskRelu.apply(x, 0.0)


class input_gradient_pass(TorchFunctionMode):
    """`with input_gradient_pass(): d = critic(x_hat)` -- the forward of a penalty pass whose
    only use is `autograd.grad(d, x_hat, create_graph=True)`. Parameters get no gradient through
    the forward activations of this pass, only through the input gradient."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and not isinstance(kwargs.get("padding", args[4] if len(args) > 4 else 0), str):
            return _conv2d(*args, **kwargs)
        if func is F.leaky_relu:
            return _leaky_relu(*args, **kwargs)
        if func in (F.relu, torch.relu):
            return _relu(*args, **kwargs)
        return func(*args, **kwargs)
