"""BUL KV."""
