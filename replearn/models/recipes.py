"""Named models for `pretrain model=<name>`: an architecture, a loss and their options.

A recipe returns config values; anything the user sets explicitly wins, and what neither sets
falls back to the loss's reference defaults (losses.py). The table names each row by it.
Architectures and their feature sizes are listed in zoo.py.
"""
from __future__ import annotations

from ..core.utils import make_registry

RECIPES, register_recipe = make_registry("model")


def recipe(name: str, **values):
    register_recipe(name)(lambda: dict(values))


# -- the two papers (docs/protocol.md s.1)
recipe("dcgan", arch="dcgan", loss="dcgan")        # Radford et al.: the ImageNet critic, BCE
recipe("wgan-gp", arch="dcgan", loss="wgan-gp")    # the same widths, no BN, gradient penalty
recipe("wgan", arch="dcgan", loss="wgan")          # weight clipping, RMSprop
# WGAN-GP on the two time-scale update rule (Heusel et al. 2017): one critic step per generator step
# at 4x the generator's rate, instead of five at the same rate: 1.45 s a generator step on 2 cores
# against ~6 s. Measured as a faster CPU WGAN-GP (benchmarks/results/cpu_preset): its critic's features
# got WORSE than the untrained control (2000 steps: 51.8% against 57.2% at 400 per class), where the
# reference recipe's reach +3.0 at 2000 steps; kept as a recipe so that the comparison can be rerun
recipe("wgan-gp-ttur", arch="dcgan", loss="wgan-gp", n_critic=1, lr_d=4e-4)
# the same with the critic's layer normalisation that Gulrajani et al. recommend in place of BatchNorm
# (`norm=layer`: conv2..conv6 normalised per sample over C x H x W): the unnormalised TTUR critic's deep
# layers grew 1,650x against conv1 (benchmarks/results/cpu_preset), which the unscaled SVM cannot undo.
# Measured to 500 steps: no collapse of the probe (-0.2 points against its own control, where the
# unnormalised TTUR critic was at -7.3), but no gain yet either, and blob samples; not a preset model
recipe("wgan-gp-ln-ttur", arch="dcgan", loss="wgan-gp", n_critic=1, lr_d=4e-4, norm="layer")
# the same with spectral norm on every critic layer instead (SAGAN's pairing of SN with TTUR): no
# per-sample normalisation, so the exact cheap penalty pass (penalty.py) still applies, ~1.6 s a step
# on 2 AVX512-BF16 cores. Measured (benchmarks/results/cpu_preset): WORSE with steps under the unscaled
# probe, 57.3% (control) -> 55.5 (500) -> 54.3 (1000) -> 52.2% (2000 steps, -5.0); not a preset model
recipe("wgan-gp-sn-ttur", arch="dcgan", loss="wgan-gp", n_critic=1, lr_d=4e-4, spectral_norm=True)
# the same with the DCGAN critic's BatchNorm kept (conv2..conv6), which Gulrajani et al. advise against: BN
# couples the samples of a batch, so the penalty is on the batch's gradient, not each sample's
# (force_batchnorm). It keeps each layer's scale fixed as in DCGAN, where the unnormalised TTUR critic's deep
# layers outgrew conv1 1,650x. Measured (benchmarks/results/cpu_preset): 2000 steps in 48 min on 2
# AVX512-BF16 cores, and the unscaled probe GAINS with steps: the `cpu` preset's WGAN-GP
recipe("wgan-gp-bn-ttur", arch="dcgan", loss="wgan-gp", n_critic=1, lr_d=4e-4, norm="batch", force_batchnorm=True)

# -- other families the seeds ask for
# vanilla GAN of fully connected layers (3 x 512, LeakyReLU D, ReLU/BN G, tanh), no critic norm
recipe("mlp-gan", arch="mlp", loss="dcgan", norm="none")
# gan_cifar_resnet.py: ResNet G/D, WGAN-GP, plus spectral norm on every critic layer; its Adam
# settings (lr 2e-4, betas (0, 0.9)) with the linear decay to 0
recipe("wgan-gp-sn-resnet", arch="resnet", loss="wgan-gp", norm="none", spectral_norm=True,
       lr_g=2e-4, lr_d=2e-4, beta1=0.0, beta2=0.9, lr_decay="linear")
# SNGAN's CIFAR setting: ResNet, spectral norm, hinge loss, 5 critic steps, lr 2e-4, betas (0, 0.9)
recipe("resnet-hinge", arch="resnet", loss="hinge", norm="none", spectral_norm=True, n_critic=5,
       lr_g=2e-4, lr_d=2e-4, beta1=0.0, beta2=0.9)
# SAGAN at 32x32: the DCGAN net with spectral norm in D, self-attention at 16x16 in G and D, hinge
# loss with its two time-scale learning rates (1e-4 G, 4e-4 D; hinge defaults)
recipe("sagan", arch="dcgan", loss="hinge", norm="none", spectral_norm=True, attention_res=16)
# DenseNet-style blocks in G and D, WGAN-GP (unnormalised critic, the WGAN-GP default)
recipe("dense-wgan-gp", arch="dense", loss="wgan-gp")

# -- optimizer comparison on the same model (docs/protocol.md s.1: RMSprop, Adam and SGD); `dcgan` is the
# Adam row. Learning rates are common starting points, not tuned: RMSprop at DCGAN's Adam rate,
# SGD with momentum 0.9 at 10x that rate (its effective step is ~ lr / (1 - momentum)).
recipe("dcgan-rmsprop", arch="dcgan", loss="dcgan", optimizer="rmsprop", lr_g=2e-4, lr_d=2e-4)
recipe("dcgan-sgd", arch="dcgan", loss="dcgan", optimizer="sgd", lr_g=2e-3, lr_d=2e-3, momentum=0.9)
