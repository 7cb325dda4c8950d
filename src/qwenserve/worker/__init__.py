"""Workers: claim jobs from the store, run the engine, store media, record the outcome."""
