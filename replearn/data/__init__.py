"""Images in: any source spec (parquet, hf:, CIFAR batches, Imagenet32, JPEG trees, class folders, idx) ->
one uint8 HDF5 cache per (source, size). specs.py parses the spec, readers.py opens its kind, images.py
decodes and fits each image, cache.py writes and finds the cache (the `prepare` stage); `subset` (a
labelled subset cache) is a stage of its own. The names below are the package's API."""
from .cache import Config, cache_path, cached, load_source, run, source_id
from .images import DRAFT_MARGIN, decode_image, fit_array, fit_square
from .readers import read_idx_file
from .specs import DataError, absolute_spec, parse_spec, require_labelled

__all__ = ["Config", "cache_path", "cached", "load_source", "run", "source_id", "DRAFT_MARGIN", "decode_image",
           "fit_array", "fit_square", "read_idx_file", "DataError", "absolute_spec", "parse_spec", "require_labelled"]
