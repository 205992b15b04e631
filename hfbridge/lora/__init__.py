"""LoRA adapters: many PEFT adapters served at once over one base model (vLLM's names).

request.py: `LoRARequest`, what a request names. peft_folder.py: a PEFT folder read and checked. layers.py: the
grouped shrink/expand added to the base projections. manager.py: a worker's adapter slots and its LRU of loaded
adapters, and the per-step row mapping."""
