"""The serving core: the KV cache (kv_cache.py), the model runner that owns the compiled
plans and their recordings (runner.py), the sampler (sampler.py) and the continuous-batching
scheduler (scheduler.py) that drives them for the pipeline, the CLI and the server."""
