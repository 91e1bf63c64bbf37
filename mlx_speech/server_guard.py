"""What keeps the speech server a local service that slow clients cannot hold.

- ``LocalOnly``, an ASGI middleware in front of every route: a browser page must not be able to
  drive the server. It refuses a ``Host`` that is not this machine's (DNS rebinding: a page whose
  name resolves to 127.0.0.1 still sends its own name), a foreign ``Origin`` (a cross-site
  request), and a body that is not ``application/json`` (the "simple" cross-site POST a browser
  sends without asking first is ``text/plain`` or a form).
- ``timed_h11``: uvicorn's h11 protocol with a deadline on the request head. uvicorn arms no timer
  on a new connection, and the one it arms between requests (keep-alive) is cancelled by the
  first byte, so a client that sends half its headers is held forever. Each connection here must
  hand a complete request head to the application within the deadline of connecting or of its
  previous response; the application bounds its own body read.
- ``error_response``: the OpenAI error body, ASCII-only so that any message or field name (a lone
  surrogate from the client's JSON) can be encoded.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

# How loopback appears in Host and Origin headers (IPv6 literals are bracketed there).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
# --host values that listen on every interface.
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
# Methods whose body is read: it must be JSON.
BODY_METHODS = ("POST", "PUT", "PATCH")


class ErrorResponse(JSONResponse):
    """A JSON body rendered in ASCII (``\\uXXXX`` escapes), so that it always encodes."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(message: str, param: str | None = None, status: int = 400,
                   headers: dict[str, str] | None = None) -> ErrorResponse:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ErrorResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                         status_code=status, headers=headers)


def _bracketed(name: str) -> str:
    """A host name as it appears in a Host header: lower case, IPv6 literals in brackets."""
    name = name.strip().lower()
    return f"[{name}]" if ":" in name and not name.startswith("[") else name


def host_name(authority: str) -> str | None:
    """The host of a Host header or URL authority, without its port: ``'[::1]:8000'`` →
    ``'[::1]'``, ``'LocalHost'`` → ``'localhost'``; None when it is malformed."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return None
        name, rest = authority[: end + 1], authority[end + 1 :]
    else:
        name, colon, port = authority.partition(":")
        rest = colon + port
    if rest and not (rest[0] == ":" and all(c in "0123456789" for c in rest[1:])):
        return None
    return name or None


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") else name)
    except ValueError:
        return False
    return name.startswith("[") == (":" in name)  # IPv6 bracketed, IPv4 not


@dataclass(frozen=True)
class HostPolicy:
    """Which Host and Origin host names a server accepts."""

    names: frozenset[str]
    any_ip: bool  # listening on every interface: a Host that is an IP address is accepted too

    @classmethod
    def for_server(cls, host: str, allow_hosts: Iterable[str] = ()) -> HostPolicy:
        """Loopback, the listening address ``host`` (unless it is a wildcard) and ``allow_hosts``.

        With a wildcard ``host`` (0.0.0.0, ::) clients on the network reach the server by an IP
        address, and any IP address is accepted in Host: DNS rebinding needs a *name* that an
        attacker controls, so an address cannot be one. Names need ``allow_hosts``.
        """
        wildcard = host.strip() in WILDCARD_HOSTS
        names = {*LOOPBACK_NAMES, *(_bracketed(n) for n in allow_hosts)}
        if not wildcard:
            names.add(_bracketed(host))
        return cls(frozenset(names), wildcard)

    def accepts_host(self, header: str) -> bool:
        name = host_name(header)
        return name is not None and (name in self.names or (self.any_ip and _is_ip_literal(name)))

    def accepts_origin(self, header: str) -> bool:
        """An Origin of this machine (any port); ``null`` and other sites are refused."""
        try:
            url = urlsplit(header.strip())
        except ValueError:
            return False
        return url.scheme in ("http", "https") and host_name(url.netloc) in self.names


class LocalOnly:
    """ASGI middleware: refuse requests that a browser page could make on another site's behalf.

    ``Host`` not this machine's → 421; a foreign ``Origin`` → 403; a POST whose
    ``Content-Type`` is not ``application/json`` (parameters such as charset allowed) → 415.
    Requests with no ``Origin`` (every non-browser client) and no ``Host`` (HTTP/1.0) pass.
    """

    def __init__(self, app, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                await error_response(refusal[1], status=refusal[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> tuple[int, str] | None:
        """``(status, message)`` for a request to refuse, None for one to serve."""
        seen: dict[bytes, list[str]] = {}
        for key, value in scope["headers"]:
            if key in (b"host", b"origin", b"content-type"):
                seen.setdefault(key, []).append(value.decode("latin-1"))
        if any(len(values) > 1 for values in seen.values()):
            name = next(k for k, v in seen.items() if len(v) > 1).decode()
            return 400, f"the request has more than one {name} header"
        allowed = ", ".join(sorted(self.policy.names))
        host = seen.get(b"host", [None])[0]
        if host is not None and not self.policy.accepts_host(host):
            return 421, (f"Host {host[:100]!r} is not this server: it answers to {allowed}"
                         f"{' or an IP address' if self.policy.any_ip else ''}; start it with "
                         "--allow-host NAME to accept another name")
        origin = seen.get(b"origin", [None])[0]
        if origin is not None and not self.policy.accepts_origin(origin):
            return 403, (f"requests from web pages of other sites are refused (Origin {origin[:100]!r}); "
                         f"this server accepts pages of {allowed} (--allow-host NAME adds one)")
        if scope["method"] in BODY_METHODS:
            content_type = seen.get(b"content-type", [""])[0]
            if content_type.partition(";")[0].strip().lower() != "application/json":
                return 415, (f"the request body must be JSON sent with 'Content-Type: application/json', "
                             f"got {content_type[:100]!r}" if content_type else
                             "the request has no Content-Type; send the JSON body with "
                             "'Content-Type: application/json'")
        return None


class _TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that does not send a request in time."""

    request_timeout = 10.0
    _deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request's head has the same time

    def connection_lost(self, exc) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None if self.transport.is_closing() else self.loop.call_later(
            self.request_timeout, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is with the application (which bounds its body read); re-armed after it
        if not self.transport.is_closing():
            self.transport.close()


def timed_h11(request_timeout: float) -> type[H11Protocol]:
    """An HTTP protocol class for ``uvicorn.Config(http=...)`` that closes a connection that has
    not sent a complete request head within ``request_timeout`` seconds of connecting or of its
    previous response (half-sent headers, or nothing at all)."""
    return type("TimedH11Protocol", (_TimedH11Protocol,), {"request_timeout": float(request_timeout)})
