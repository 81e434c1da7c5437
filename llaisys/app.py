"""`hypercorn llaisys.app:app`: the server configured from LLAISYS_* environment variables (see llaisys.server)."""
import logging

from .server import create_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("hypercorn.error").propagate = False  # hypercorn prints its own lines
app = create_app()
