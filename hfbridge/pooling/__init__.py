"""Pooling: PoolingParams, runner/task resolution, the poolers, the wrappers of encoder and classifier
models, pooling outputs and pair scoring."""
