"""`velotune dashboard RUNS_DIR`: a local web page that watches, compares and tries runs.

It reads what runs write (config.yaml, status.json, metrics.jsonl, summary.json, data_report.txt, checkpoints) and
keeps no state of its own besides a cache of those files; the only thing it does besides reading is answer a chat
message with a run's model, when asked.
"""

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8765
