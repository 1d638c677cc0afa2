"""Every failure the server reports: OpenAI's JSON error body, the right status, one line naming the problem and
the fix. Tracebacks go to the server log, never to the client."""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import JSONResponse

from mindvl.errors import ArtifactError, CheckpointError, MediaTooLargeError, MindVLError

log = logging.getLogger("mindvl.serve")

# OpenAI's error `type` for the statuses that are not the client's request itself (invalid_request_error).
TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 500: "server_error",
         503: "server_error"}


class ServeError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_mindvl(e: MindVLError, param: str | None = None) -> ServeError:
    """An expected failure of the runtime or preprocessing: the request's fault (400, 413 for media too large to
    decode) unless the artifact folder itself is broken (500: the operator must re-export). That message names
    files of the server's disk, so it goes to the log and the client learns only that the server is broken."""
    if isinstance(e, (ArtifactError, CheckpointError)):
        log.error("the artifacts cannot serve a request: %s", e)
        return ServeError(500, "the server's artifact folder is broken; see the server log", code="artifact_error")
    return ServeError(413 if isinstance(e, MediaTooLargeError) else 400, str(e), param)
