"""An OpenAI-compatible HTTP server with continuous batching and a chat page.

    meganeura serve --model smollm2-135m-instruct      # then http://127.0.0.1:8000/
"""

from .app import ServerThread, create_app, serve
from .config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve", "ServerThread"]
