"""Images in prompts: the model's own processor expands placeholders (processor.py), images come from PIL objects
or URLs (media.py), the vision encoder's outputs are cached by the image's content (encoder_cache.py) and scattered
into the packed token stream of a step (embeddings.py)."""
