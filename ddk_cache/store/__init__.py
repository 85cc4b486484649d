"""The cache on disk: its format (cache.py), encodings and codecs, direct row reads, verification."""

from .cache import SPLITS, Cache, CacheBatch, CacheWriter

__all__ = ["SPLITS", "Cache", "CacheBatch", "CacheWriter"]
