"""APIError: an error answer in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with its status."""
from __future__ import annotations

from typing import Any, Optional

# HTTP status -> OpenAI error type.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error", 500: "server_error", 503: "unavailable_error", 504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        default = "invalid_request_error" if self.status < 500 else "server_error"  # 405, 413, ...
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, default),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param)
