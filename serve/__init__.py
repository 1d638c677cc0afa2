"""An OpenAI-compatible HTTP server over the runtime: `mindvl serve ARTIFACTS`.

Kept out of the runtime's import path: `mindvl.runtime` never imports FastAPI or uvicorn.
"""

from mindvl.serve.app import Settings, create_app
from mindvl.serve.server import serve

__all__ = ["Settings", "create_app", "serve"]
