"""Where a step runs: executors, the model runner that packs a step into one token stream, and KV-cache
sizing and allocation."""
