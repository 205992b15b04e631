"""Tensor and pipeline parallelism from a model's `base_model_tp_plan` / `base_model_pp_plan`.

Not built yet: hfbridge runs one process on one device. `tensor_parallel_size` / `pipeline_parallel_size`
above 1 are refused with a clear error by the engine config.
"""
