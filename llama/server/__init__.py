"""An OpenAI-compatible HTTP server (``python -m llama.server``) that batches concurrent requests on the engine.

``app`` holds the routes, ``schemas`` the request checks and response shapes, ``scheduler`` the worker that owns the
engine; the optional dependencies come with ``pip install 'llama[server]'``.
"""
