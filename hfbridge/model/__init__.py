"""Finding, configuring and loading a model: sources (folder, Hub, ModelScope, GGUF), the HF config, the
class resolution (native / Transformers / remote code), meta build and streamed weights, hfbridge's wrappers."""
