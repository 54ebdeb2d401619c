"""Sampling runs: many class-conditional samples (an FID's 50,000) as shards of ordinary jobs, written to a
shared results store and assembled into the ADM evaluator's ``.npz``.

- ``store``: the results store on disk (run records, shard files with checksums, the assembled arrays).
- ``plan``: a run request -> labels, seeds and shards (pure, no I/O).
- ``shards``: the worker's side: a shard job's images go to the store, not to Redis.
- ``keeper``: the API's side: follows shards, resubmits lost ones, cancels, assembles, reports.
"""
