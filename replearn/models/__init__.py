"""Networks (uint8 in, normalised inside), their registry of architectures, the GAN losses, the gradient
penalty and the named recipes (arch + loss + options) the other stages train."""
