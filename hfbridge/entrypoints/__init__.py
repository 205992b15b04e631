"""How users reach hfbridge: the `LLM` class and the `hfbridge` command line."""
