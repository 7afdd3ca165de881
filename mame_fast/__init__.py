"""mame-fast: high-throughput from-scratch CNN training on MAMe (Museum Art Medium).

The packages follow the data flow, each depending only on those before it:

- ``data``: stage 1, source images -> shards (metadata, sample, source, format, shard);
- ``input``: stage 2, shards -> batches (plan, reader, loader contract, DALI, fallback);
- ``train``: stages 3-4, the model and its training (model, runtime, evaluate, checkpoint, state, loop,
  testset);
- ``records``: stage 5, what a run leaves behind and what is read from it (rundir, records, plots, live,
  diagnose, report, explore).

``config`` and ``files`` serve them all; ``cli`` is the command line. Nothing runs at import time.
"""

__version__ = "0.1.0"
