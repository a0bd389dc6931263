"""replearn: how good are the features a GAN critic learns without labels?"""
__version__ = "0.1.0"
