"""More GAN families for ARCHS (MLP, residual, dense): filled in by the GAN-zoo work."""
