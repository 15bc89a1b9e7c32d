"""Bearer-token authentication: hashed API tokens, or HS256 JWTs when RUNNER_JWT_SECRET is set."""

from __future__ import annotations

import asyncio

import jwt
from fastapi import Request

from codex_runner.errors import Forbidden, NotAuthenticated
from codex_runner.runtime import Runtime
from codex_runner.secrets import TOKEN_PREFIX
from codex_runner.store.admin import ROLES, Principal


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise NotAuthenticated("missing Authorization: Bearer <token> header")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token or len(token) > 4096:
        raise NotAuthenticated("malformed Authorization header; expected 'Bearer <token>'")
    return token


def authenticate(runtime: Runtime, token: str) -> Principal:
    if token.startswith(TOKEN_PREFIX):
        principal = runtime.tokens.authenticate(token)
        if principal is None:
            raise NotAuthenticated("invalid or revoked token")
        return principal
    secret = runtime.settings.jwt_secret
    if secret and token.count(".") == 2:
        try:
            claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["sub"]})
        except jwt.PyJWTError:
            raise NotAuthenticated("invalid or expired token") from None
        sub = claims.get("sub")
        role = claims.get("role", "user")
        if not isinstance(sub, str) or not sub or role not in ROLES:
            raise NotAuthenticated("invalid token claims")
        return Principal(sub, role)
    raise NotAuthenticated("invalid or revoked token")


async def current_principal(request: Request) -> Principal:
    runtime: Runtime = request.app.state.runtime
    principal = await asyncio.to_thread(authenticate, runtime, _bearer(request))
    request.state.principal = principal
    return principal


def require_admin(principal: Principal) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this route is for admins")
    return principal
