"""Corrections to the OpenAPI document FastAPI builds, so it says what the service answers."""

from __future__ import annotations

import json
from typing import Any

#: The routes that answer without a token (SPEC §4); every other one needs the bearer scheme.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "an API token from `codex-runner tokens create`, or an HS256 JWT with RUNNER_JWT_SECRET",
}
JSON = "application/json"


def finish(schema: dict[str, Any]) -> dict[str, Any]:
    """Declares the bearer scheme on every route that needs it, drops FastAPI's 422 (validation
    errors answer 400 `invalid_request`, api/errors.py), and documents every error answer as the
    JSON it is: FastAPI files an error model under the route's own media type (`text/plain` for
    `/metrics`, `text/event-stream` for a log stream)."""
    paths: dict[str, dict[str, Any]] = schema.get("paths", {})
    for path, operations in paths.items():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            if path not in OPEN_PATHS:
                operation["security"] = [{"bearer": []}]
            responses: dict[str, Any] = operation.get("responses", {})
            responses.pop("422", None)
            for code, response in responses.items():
                content = response.get("content")
                if code[:1] in "45" and content and JSON not in content:
                    response["content"] = {JSON: next(iter(content.values()))}
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = BEARER
    models = components.get("schemas", {})
    if "HTTPValidationError" in models and '"#/components/schemas/HTTPValidationError"' not in json.dumps(
        paths
    ):
        models.pop("HTTPValidationError", None)
        models.pop("ValidationError", None)
    return schema
