"""Pretraining: the GAN training loop, the run-folder layout and its checkpoints, generated images, and the
quality measures (FID, Wasserstein estimate, diversity, nearest neighbours) and report of a run."""
