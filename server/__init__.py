"""OpenAI-compatible aiohttp server (see `hfbridge serve`)."""
from hfbridge.server.app import build_app, serve
from hfbridge.server.state import STATE, ServerSettings

__all__ = ["STATE", "ServerSettings", "build_app", "serve"]
