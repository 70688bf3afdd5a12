"""Rewards as a service: ``visalign rewards serve`` (docs/rewards.md, "Remote rewards").

The server lives here, above the rewards it serves; the client is the ``remote`` reward
(:mod:`visalign.rewards.remote`), and both speak :mod:`visalign.rewards.wire`.  Starlette and
uvicorn are imported only when a server is built (``pip install 'visalign[serve]'``).
"""

from .server import Limits, create_app, load_served, serve

__all__ = ["Limits", "create_app", "load_served", "serve"]
