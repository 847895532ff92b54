"""The serving core: the KV cache and its prefix cache (kv_cache.py), the model runner that
owns the compiled plans and their recordings (runner.py), the sampler (sampler.py), the
continuous-batching scheduler (scheduler.py) that drives them for the pipeline, the CLI and
the server, and the vision-feature cache (feature_cache.py)."""
