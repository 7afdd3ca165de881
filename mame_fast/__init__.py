"""mame-fast: high-throughput from-scratch CNN training on MAMe (Museum Art Medium).

Stages, one module each: metadata -> sample (stand-in data) -> source/shard (WebDataset shards) ->
plan (epoch order, buckets, crops) -> pipeline (DALI) / pilloader (fallback) -> model -> train ->
records/diagnose/report. Nothing runs at import time.
"""

__version__ = "0.1.0"


def atomic_write_text(path, text: str) -> None:
    """Write a text file so that readers see the old content or the new, never half of it."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _mp_context():
    """Process pool context for image work: fork where available (no re-import per worker, and it
    works from an interactive main), spawn elsewhere."""
    import multiprocessing as mp

    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
