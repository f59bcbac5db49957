"""The transformers versions specbench supports (pyproject.toml states the range), in one place.

transformers 5.24 renamed the decoders' KV-cache keyword from `past_key_values` to `cache`;
passing the old name there warns on every call. Earlier 5.x releases know only the old name.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _cache_argument(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwargs(module, cache) -> dict:
    """{keyword: cache} for calling a transformers decoder `module` with a KV cache."""
    return {_cache_argument(type(module).forward): cache}
