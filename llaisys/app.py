"""`hypercorn llaisys.app:app`: the server configured from LLAISYS_* environment variables (see llaisys.server)."""
import logging

from .server import create_app

# hypercorn prints its own lines; llaisys's go to stderr beside them (unless the host configured logging).
_log = logging.getLogger("llaisys")
if not _log.handlers and not logging.getLogger().handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
app = create_app()
