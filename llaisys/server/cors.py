"""CORS for browser clients on other origins: off unless origins are configured ("*" = any).

A preflight (OPTIONS with Access-Control-Request-Method) is answered at once; the headers a
request may carry are the JSON ones, `Authorization`, and the openai SDKs' own (`x-stainless-*`,
`openai-*`). Answers to an allowed origin name it, so a browser lets the page read them.
"""
from __future__ import annotations

from typing import Optional

SIMPLE_HEADERS = {"authorization", "content-type", "accept", "accept-language", "content-language"}
HEADER_PREFIXES = ("x-stainless-", "openai-")
METHODS = "GET, POST, OPTIONS"
MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer


class Cors:
    def __init__(self, origins: list[str]):
        self.origins = origins

    def allows(self, origin: Optional[str]) -> bool:
        return bool(origin) and bool(self.origins) and ("*" in self.origins or origin in self.origins)

    def headers(self, origin: str) -> dict[str, str]:
        """Headers for any answer to an allowed origin."""
        return {"Access-Control-Allow-Origin": "*" if "*" in self.origins else origin, "Vary": "Origin"}

    def preflight(self, origin: str, requested: str) -> Optional[dict[str, str]]:
        """The preflight answer's headers; None when a requested header is not allowed."""
        names = [h.strip().lower() for h in requested.split(",") if h.strip()]
        if any(n not in SIMPLE_HEADERS and not n.startswith(HEADER_PREFIXES) for n in names):
            return None
        return {**self.headers(origin), "Access-Control-Allow-Methods": METHODS,
                "Access-Control-Allow-Headers": ", ".join(names) or "content-type", "Access-Control-Max-Age": MAX_AGE}
