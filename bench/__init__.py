"""BUL KV benchmarks: measurements run in one process, printed as tables and written as JSON."""
