"""Bearer-token authentication: hashed API tokens, or HS256 JWTs when RUNNER_JWT_SECRET is set."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated

import jwt
from fastapi import Query, Request
from pydantic import AfterValidator

from codex_runner.errors import Forbidden, NotAuthenticated
from codex_runner.runtime import Runtime
from codex_runner.secrets import TOKEN_PREFIX
from codex_runner.store.admin import ROLES, Principal, valid_user


def bearer_token(request: Request) -> str:
    return parse_bearer(request.headers.get("authorization"))


def parse_bearer(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header; `NotAuthenticated` otherwise."""
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
    return _jwt_principal(runtime, token)


def authenticate_many(runtime: Runtime, raw_tokens: Sequence[str]) -> list[Principal | NotAuthenticated]:
    """`authenticate` for a batch of requests: the API tokens in one read, each still checked
    against the table (no cache). `StoreUnavailable` is the whole batch's answer."""
    looked_up = iter(runtime.tokens.authenticate_many([t for t in raw_tokens if t.startswith(TOKEN_PREFIX)]))
    out: list[Principal | NotAuthenticated] = []
    for token in raw_tokens:
        try:
            if token.startswith(TOKEN_PREFIX):
                principal = next(looked_up)
                if principal is None:
                    raise NotAuthenticated("invalid or revoked token")
                out.append(principal)
            else:
                out.append(_jwt_principal(runtime, token))
        except NotAuthenticated as exc:
            out.append(exc)
    return out


def _jwt_principal(runtime: Runtime, token: str) -> Principal:
    secret = runtime.settings.jwt_secret
    if secret and token.count(".") == 2:
        try:
            claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["sub"]})
        except jwt.PyJWTError:
            raise NotAuthenticated("invalid or expired token") from None
        sub = claims.get("sub")
        role = claims.get("role", "user")
        if not valid_user(sub) or role not in ROLES:
            raise NotAuthenticated("invalid token claims")
        return Principal(sub, role)
    raise NotAuthenticated("invalid or revoked token")


async def current_principal(request: Request) -> Principal:
    runtime: Runtime = request.app.state.runtime
    principal = await asyncio.to_thread(authenticate, runtime, bearer_token(request))
    request.state.principal = principal
    return principal


def require_admin(principal: Principal) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this route is for admins")
    return principal


def _lower(value: str | None) -> str | None:
    return None if value is None else value.lower()


# Ids as clients may write them: a UUID in capitals is the same job (the ids stored are lower
# case, as a create already takes a repo id in either case).
JobId = Annotated[str, AfterValidator(_lower)]
# A repo's id (any case) or its name, which is case-sensitive: `Catalog.filter_repo_id` tells them
# apart, so the value reaches it as sent.
RepoIdFilter = Annotated[
    str | None,
    Query(max_length=200, description="a repo's id or its name, as `GET /api/runner/repos` lists them"),
]
