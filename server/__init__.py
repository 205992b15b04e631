"""OpenAI-compatible aiohttp server (see `hfbridge serve`)."""
