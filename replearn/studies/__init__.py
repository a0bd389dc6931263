"""The seed papers' studies (WGAN grid, ablation ladder, augmentation): each a list of recipes and a table, built
from the keyed stages, with no trainer of its own."""
