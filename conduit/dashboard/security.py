"""Who may see the dashboard, and which POSTs are the dashboard's own.

Rule 1: nothing is served without the token, not a page, a fragment or a static file: a request
carries it as `Authorization: Bearer TOKEN`, or as the session cookie that the token bought.
Rule 2: the token is accepted in a URL once (`?token=`, the link `conduit dashboard` prints): the
answer sets the cookie (HttpOnly, SameSite=Strict) and redirects to the same page without it, so
it stays out of the address bar, the history and any Referer.
Rule 3: an action is a POST that carries the session's CSRF token in its form, and whose Origin,
when the browser sends one, is the dashboard's own. A POST with the bearer header needs no form
token: a browser never adds that header to a cross-site request by itself.

Sessions are stateless: the cookie is a random id signed with the token (HMAC-SHA256), and the
CSRF token is derived from both, so restarting with another token ends every session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REFUSED = (
    "401 Unauthorized: open the link `conduit dashboard` printed (it holds ?token=), "
    "or send Authorization: Bearer TOKEN\n"
)
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make the browser send `Origin: null`
    "Cache-Control": "no-store",
}


def same(given: str, expected: str) -> bool:
    """A constant-time comparison that takes any text a request carries (compare_digest raises on
    non-ASCII str: a 500 where a refusal is due)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8", "replace"))


def new_token() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Guard:
    token: str

    def _sign(self, text: str) -> str:
        return hmac.new(self.token.encode(), text.encode(), hashlib.sha256).hexdigest()

    def cookie_for(self, session: str) -> str:
        return f"{session}.{self._sign('session:' + session)}"

    def session_of(self, cookie: str | None) -> str | None:
        """The session id a cookie proves, or None for a missing or forged one."""
        session, _, signature = (cookie or "").partition(".")
        if session and same(signature, self._sign("session:" + session)):
            return session
        return None

    def csrf_for(self, session: str | None) -> str:
        return "" if session is None else self._sign("csrf:" + session)[:32]

    def bearer(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and same(value.strip(), self.token)

    def token_matches(self, given: str) -> bool:
        return same(given, self.token)


class TokenGate:
    """ASGI middleware for rules 1 and 2: sets `scope["state"]["session"]` (None under the bearer
    header) for what it lets through, and adds the security headers to every answer."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # a websocket: the dashboard has none, and serves nothing unasked
            await send({"type": "websocket.close", "code": 1008})
            return
        request = Request(scope)
        cookie = f"conduit_session_{request.url.port}"  # cookies ignore ports: one per dashboard
        response: Response | None = None
        given = request.query_params.get("token")
        if given is not None:
            response = PlainTextResponse(REFUSED, 401)
            if self.guard.token_matches(given):
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                response = RedirectResponse(str(URL(scope=scope).replace(query=urlencode(rest))), 303)
                response.set_cookie(
                    cookie, self.guard.cookie_for(secrets.token_urlsafe(16)), httponly=True, samesite="strict"
                )
        elif self.guard.bearer(request):
            scope.setdefault("state", {})["session"] = None
        elif (session := self.guard.session_of(request.cookies.get(cookie))) is not None:
            scope.setdefault("state", {})["session"] = session
        else:
            response = PlainTextResponse(REFUSED, 401)

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] += [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
            await send(message)

        if response is not None:
            await response(scope, receive, secured)
        else:
            await self.app(scope, receive, secured)


class Refused(Exception):
    """A POST that is not the dashboard's own (rule 3); nothing was done."""


async def action_form(request: Request, guard: Guard) -> dict[str, list[str]]:
    """The fields of an action's form, once rule 3 holds; else Refused."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
        raise Refused(f"cross-origin request from {origin!r} refused")
    if request.headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
        raise Refused("cross-site request refused")
    fields = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    session = request.state.session
    if session is not None:  # the bearer header needs no form token (rule 3)
        sent = (fields.get("csrf") or [""])[0]
        if not same(sent, guard.csrf_for(session)):
            raise Refused("missing or wrong form token (reload the page)")
    return fields
