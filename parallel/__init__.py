"""Tensor and pipeline parallelism from a model's `base_model_tp_plan` / `base_model_pp_plan` on torch.distributed
(gloo on CPU, NCCL on CUDA).

- `state.py`: the process group and this rank's place in it (world = tp x pp, TP groups inside each stage, the
  point-to-point hand-off between stages);
- `styles.py`: the table of plan styles (colwise, rowwise, ...) and how each shards a module;
- `tp_plan.py`: reads the plan Transformers merged for a built model, checks it, applies it on the meta model;
- `pp_plan.py`: splits the pp plan's one ModuleList into stages (HFBRIDGE_PP_LAYER_PARTITION or vLLM's even split)
  and leaves each stage only its modules, on the meta model.
"""
