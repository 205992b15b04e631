"""The scheduler's world, pure Python and model-free: requests, the token-budget scheduler, the KV-cache
manager and its block pool, and the typed hand-off of one step (SchedulerOutput / ModelRunnerOutput)."""
