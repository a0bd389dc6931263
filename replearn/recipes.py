"""Named models for `pretrain model=<name>`: an architecture, a loss and their options.

A recipe returns config values; anything the user sets explicitly wins, and what neither sets
falls back to the loss's reference defaults (losses.py). The table names each row by it.
"""
from __future__ import annotations

from .utils import make_registry

RECIPES, register_recipe = make_registry("model")


def recipe(name: str, **values):
    register_recipe(name)(lambda: dict(values))


recipe("dcgan", arch="dcgan", loss="dcgan")        # Radford et al.: the ImageNet critic, BCE
recipe("wgan-gp", arch="dcgan", loss="wgan-gp")    # the same widths, no BN, gradient penalty
recipe("wgan", arch="dcgan", loss="wgan")          # weight clipping, RMSprop
