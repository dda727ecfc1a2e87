"""The guard in front of ``dfm serve``: only the server's own pages, only JSON, bounded bodies.

A request whose ``Host`` or ``Origin`` header is not the server's own address is refused (403: cross-site requests
and DNS rebinding); with a token (a server bound beyond the loopback) a request must carry it, as the cookie the
printed URL sets or the ``X-DFM-Token`` header (403); a POST must be ``application/json`` (415: a browser does not
send that cross-site without asking first); a body is counted as it is read, whatever its headers say, and refused
past :data:`MAX_BODY` bytes (413) without reading the rest; :func:`parse_json` refuses bodies nested deeper than
:data:`MAX_DEPTH` (422).
"""

from __future__ import annotations

import contextlib
import http.cookies
import ipaddress
import json
import re
import secrets
import socket
import urllib.parse
from typing import Any

MAX_BODY = 16_384  # bytes of a request body
MAX_DEPTH = 8  # levels of [ and { in a request body (the settings need 2)
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
WILDCARD = frozenset({"0.0.0.0", "::", ""})  # bind every address of the machine
TOKEN_HEADER = "x-dfm-token"


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server to this machine (127.0.0.1, ::1 or localhost)."""
    return host.strip("[]").lower() in LOOPBACK


def _split_address(netloc: str) -> tuple[str, int] | None:
    """``"name:port"`` or ``"[v6]:port"`` (a Host header, an Origin without its scheme) as (name, port); None if
    malformed. A missing port is HTTP's 80."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        end = netloc.find("]")
        name, rest = (netloc[1:end], netloc[end + 1 :]) if end > 0 else ("", "")
    else:
        name, colon, port = netloc.partition(":")
        rest = colon + port
    if not name or (rest and not (rest[:1] == ":" and rest[1:].isdigit() and len(rest) <= 6)):
        return None
    return name, int(rest[1:]) if rest else 80


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Guard:
    """Pure ASGI middleware in front of every request, in this order: the ``Host`` header and the ``Origin`` header
    (when sent) must name this server (403); the token, when the server has one (403); a POST must be
    ``application/json`` (415); a body may be at most :data:`MAX_BODY` bytes, counted as it is read (413, answered
    as soon as the limit is passed, the rest never read). Refusals are JSON ``{"error": ...}`` naming the header."""

    def __init__(self, app, *, host: str, port: int, token: str | None) -> None:
        self.app, self.port, self.token = app, port, token
        bound = host.strip("[]").lower()
        names = {bound}
        if is_loopback(bound) or bound in WILDCARD:
            names |= LOOPBACK
        if bound in WILDCARD:  # every address of the machine: its names, and any IP literal (not a DNS name)
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.names, self.any_ip = frozenset(names - WILDCARD), bound in WILDCARD
        self.cookie = f"dfm_serve_token_{port}"  # cookies are shared between the ports of a host

    def ours(self, netloc: str) -> bool:
        """Whether ``netloc`` is this server's address: a name it answers to and its port. A DNS name other than
        these could point anywhere (DNS rebinding); an IP literal cannot, so a wildcard bind accepts every one."""
        address = _split_address(netloc)
        if address is None or address[1] != self.port:
            return False
        return address[0] in self.names or (self.any_ip and _is_ip(address[0]))

    def token_given(self, scope, headers: dict[str, str]) -> tuple[bool, bool]:
        """(whether the request carries the right token, whether it came in the URL's query)."""
        want = self.token.encode()
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        cookies = http.cookies.SimpleCookie()
        with contextlib.suppress(http.cookies.CookieError):
            cookies.load(headers.get("cookie", ""))
        given = [headers.get(TOKEN_HEADER, ""), cookies[self.cookie].value if self.cookie in cookies else ""]
        same = lambda t: bool(t) and secrets.compare_digest(t.encode("utf-8", "replace"), want)  # noqa: E731
        in_query = any(same(t) for t in query)
        return in_query or any(same(t) for t in given), in_query

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host"), headers.get("origin")
        if host is None or not self.ours(host):
            return await _refuse(send, 403, f"Host header {host!r} is not this server's address: open the URL "
                                 "that dfm serve printed")  # fmt: skip
        if origin is not None and not (origin.lower().startswith("http://") and self.ours(origin[7:])):
            return await _refuse(send, 403, f"Origin header {origin!r}: requests from other web pages are refused")
        if self.token is not None:
            ok, in_query = self.token_given(scope, headers)
            if not ok:
                return await _refuse(send, 403, "this server needs its token: open the URL with ?token=... that "
                                     f"dfm serve printed (scripts: the {TOKEN_HEADER} header)")  # fmt: skip
            if in_query and scope["method"] == "GET" and scope["path"] == "/":  # the printed URL: keep it as a cookie
                cookie = f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                return await _reply(send, 303, b"", [(b"location", b"/"), (b"set-cookie", cookie.encode())])
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return await _refuse(send, 415, f"Content-Type {kind or 'missing'}: send application/json")
        if "content-length" not in headers and "transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # no body (the event streams: receive stays theirs)
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return await _refuse(send, 413, f"request too large (at most {MAX_BODY} bytes)", close=True)
        chunks, read = [], 0
        while True:  # read the body here, counting: a chunked one has no length to check beforehand
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            read += len(message.get("body", b""))
            if read > MAX_BODY:
                return await _refuse(send, 413, f"request too large (at most {MAX_BODY} bytes)", close=True)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        async def replay():  # the body once, then the connection's own messages (its disconnect)
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        return await self.app(scope, replay, send)


async def _reply(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def _refuse(send, status: int, message: str, close: bool = False) -> None:
    headers = [(b"content-type", b"application/json")] + ([(b"connection", b"close")] if close else [])
    await _reply(send, status, json.dumps({"error": message}).encode(), headers)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, refused (ValueError) when not UTF-8 or JSON, or nested deeper than
    :data:`MAX_DEPTH` (checked before parsing, so that no parser recursion is ever asked for)."""
    text = raw.decode("utf-8")
    depth = 0
    for bracket in re.findall(r"[\[\]{}]", _STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_DEPTH:
            raise ValueError(f"the request is nested too deeply (at most {MAX_DEPTH} levels of [ and {{)")
    try:
        return json.loads(text)
    except RecursionError:  # not reached after the check above; kept so that no body can give a 500
        raise ValueError(f"the request is nested too deeply (at most {MAX_DEPTH} levels of [ and {{)") from None
