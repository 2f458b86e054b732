# Changed from the guide: nothing. (The tests use this dict with `model` set to "demo", the default anyway,
# and `persistence_path` pointed at a temporary directory instead of /data/cache.)
# ruff: noqa
# fmt: off
# (lint and format are off: the code below is kept as the guide writes it)
"""The integration guide's Django settings sample: only the BUL part of a settings.py."""

# settings.py
BUL_CACHE_CONFIG = {
    'max_tokens': 8192,
    'cache_strategy': 'adaptive',
    'enable_persistence': True,
    'persistence_path': '/data/cache'
}
