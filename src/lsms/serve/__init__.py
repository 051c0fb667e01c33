"""``lsms serve``: a local web viewer to point at a lesion with a sentence (docs/serve.md).

Public API:
    Viewer: the request handlers (model + one session per browser tab), usable without HTTP.
    ViewerServer: the standard-library HTTP server around a Viewer.
"""

from lsms.serve.app import Viewer
from lsms.serve.errors import ServeError
from lsms.serve.http import ViewerServer

__all__ = ["ServeError", "Viewer", "ViewerServer"]
