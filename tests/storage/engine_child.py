"""Run one request in a fresh process: `python engine_child.py CONFIG_JSON REQUEST_JSON`.
Prints the result and the tier stats as one JSON line. The storage tests use it as the second
replica: nothing is shared with the test process but the storage backends."""

import json
import logging
import sys

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # The demo model in float32 unless the config says otherwise: the first replica, in the test
    # process, runs on it (and the dtype is part of every block hash).
    config = KVCacheConfig(**{"model": "demo", "dtype": "float32", **json.loads(sys.argv[1])})
    with UltraAdaptiveKVCacheEngine(config) as engine:
        result = engine.process_request_sync(json.loads(sys.argv[2]))
        engine.flush_storage(10)
        sys.stdout.write(json.dumps({"result": result, "tiers": engine.get_stats()["tiers"]}) + "\n")
