"""`lipsync web`, the browser bridge: `config` (its settings, no media packages) and `bridge` (aiohttp, aiortc and
PyAV: `pip install -e '.[web]'` from a checkout)."""
