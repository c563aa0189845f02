"""HTTP server for the engine: ``python -m s1_mini.server --checkpoint DIR``.

``create_app(config, options)`` builds the FastAPI app (one engine per app); see
``s1_mini.server.__main__`` for the command line.
"""

from s1_mini.server.app import create_app
from s1_mini.server.options import ServerOptions

__all__ = ["ServerOptions", "create_app"]
