"""The one error type of ``lsms serve``."""

from __future__ import annotations


class ServeError(Exception):
    """A request the viewer refuses; ``status`` is the HTTP status, the message is shown on the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
