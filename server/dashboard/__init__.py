"""The coordinator dashboard (``medfed dashboard``): a live web view of the run store."""

from medfed.server.dashboard.app import BackgroundServer, create_app, default_token_path, load_or_create_token

__all__ = ["BackgroundServer", "create_app", "default_token_path", "load_or_create_token"]
