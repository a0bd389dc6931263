"""Probes of a trained critic: its features (critic layers -> 4x4 max-pool -> HDF5), the linear L2-SVM protocol,
the pretraining curve, and the references beside them (K-means features, the supervised critic, a classifier)."""
