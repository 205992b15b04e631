"""Structured outputs: xgrammar grammars of the constraints (grammar.py; the constraint itself is
hfbridge.sample.structured_outputs_params), and the engine's compile thread, matchers and token bitmask
(manager.py)."""
