"""The engine: requests in, outputs out. Argument resolution, tokenization and chat templates, the
synchronous and async engines, output processing and incremental detokenization."""
