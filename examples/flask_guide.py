# Changed from the guide: `@app.before_first_request` was removed in Flask 2.3, so `setup_cache()` is called
# once right after the engine is built (and uses `warmup_sync()`: the guide called the async `warmup()`
# without awaiting it, which never runs). The async view needs the `flask[async]` extra.
# ruff: noqa
# fmt: off
# (lint and format are off: the code below is kept as the guide writes it)
"""The integration guide's Flask sample. For an app of your own use `bulk.integrations.flask.BUL`."""

from flask import Flask, request, jsonify
from bulk.core.ultra_adaptive_kv_cache_engine import (
    UltraAdaptiveKVCacheEngine,
    KVCacheConfig
)

app = Flask(__name__)

# Inicializar engine
cache_config = KVCacheConfig(max_tokens=8192)
cache_engine = UltraAdaptiveKVCacheEngine(cache_config)

def setup_cache():
    """Setup cache en primer request."""
    cache_engine.warmup_sync()

setup_cache()

@app.route('/api/query', methods=['POST'])
async def process_query():
    """Procesar query."""
    query_data = request.json
    result = await cache_engine.process_request(query_data)
    return jsonify(result)

@app.route('/api/stats', methods=['GET'])
def get_stats():
    """Obtener estadísticas."""
    stats = cache_engine.get_stats()
    return jsonify(stats)
