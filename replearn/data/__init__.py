"""Images in: any source spec (parquet, hf:, CIFAR batches, Imagenet32, JPEG trees, class folders, idx) ->
one uint8 HDF5 cache per (source, size). The names below are the package's API; `subset` (a labelled
subset cache) is a stage of its own."""
from .cache import (DRAFT_MARGIN, Config, DataError, absolute_spec, cache_path, cached, decode_image, fit_array,
                    fit_square, load_source, parse_spec, read_idx_file, require_labelled, run, source_id)

__all__ = ["DRAFT_MARGIN", "Config", "DataError", "absolute_spec", "cache_path", "cached", "decode_image", "fit_array",
           "fit_square", "load_source", "parse_spec", "read_idx_file", "require_labelled", "run", "source_id"]
