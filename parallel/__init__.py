"""Tensor parallelism from a model's `base_model_tp_plan` on torch.distributed (gloo on CPU, NCCL on CUDA).

- `state.py`: the process group and this rank's place in it (world = tp x pp, TP groups inside each stage);
- `styles.py`: the table of plan styles (colwise, rowwise, ...) and how each shards a module;
- `tp_plan.py`: reads the plan Transformers merged for a built model, checks it, applies it on the meta model.
Pipeline parallelism (`base_model_pp_plan`) is not built yet; pp > 1 is refused by the engine config.
"""
