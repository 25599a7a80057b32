"""Network policy of the crawl: which URLs may be fetched, and a urllib opener that enforces it.

Only http and https are fetched; a host must resolve to public unicast addresses unless an allow-list entry
(``host``, ``host:port``, ``ip``, ``ip:port``, ``[v6]:port`` or a CIDR) admits it. The driver screens every URL
before download (``screen_urls``: each distinct host resolved once); inside the download workers,
``guarded_opener`` checks every connection, redirects included, twice: the resolved addresses before
connecting, and the peer of the TCP connection before any byte is sent to it, the TLS handshake of https
included (a DNS answer may change in between). Its redirects are limited to http/https and it ignores proxy
settings (a proxy's address would hide the target's).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class _AllowEntry:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    host: str | None
    port: int | None


def _parse_allow_entry(text: str) -> _AllowEntry:
    entry, port = text.strip(), None
    if entry.startswith("["):
        address, _, rest = entry[1:].partition("]")
        entry, port = address, (int(rest[1:]) if rest.startswith(":") else None)
    elif entry.count(":") == 1:
        entry, port_text = entry.split(":")
        port = int(port_text)
    try:
        return _AllowEntry(ipaddress.ip_network(entry, strict=False), None, port)
    except ValueError:
        if not entry or "/" in entry:
            raise ValueError(f"allow-hosts entry {text!r} is not a host, host:port or CIDR") from None
        return _AllowEntry(None, entry.lower(), port)


def _non_public_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is not a public unicast address, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "non-global"


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses may be fetched: public unicast ones, plus the allow-listed entries."""

    allowed: tuple[_AllowEntry, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AddressPolicy:
        return cls(tuple(_parse_allow_entry(entry) for entry in entries if entry.strip()))

    def _allows(self, host: str, port: int, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        for entry in self.allowed:
            if entry.port is not None and entry.port != port:
                continue
            if entry.host is not None and entry.host == host.lower():
                return True
            if entry.network is not None and address.version == entry.network.version:
                if address in entry.network:
                    return True
        return False

    def refusal(self, host: str, port: int, addresses: Sequence[str]) -> str | None:
        """Why fetching ``host:port`` resolved to ``addresses`` is refused, or None when it is allowed."""
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            kind = _non_public_kind(address)
            if kind is not None and not self._allows(host, port, address):
                return f"refused {kind} address {address} for {host}:{port}"
        return None


def _resolve(host: str) -> tuple[str, ...] | str:
    """The addresses ``host`` resolves to, or the resolver's error message."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as error:
        return f"dns: {error}"
    return tuple(sorted({info[4][0] for info in infos}))


def screen_urls(
    urls: Sequence[str | None], policy: AddressPolicy, resolver_threads: int = 32
) -> list[str | None]:
    """For each URL, why it will not be fetched (scheme, malformed, DNS failure, refused address) or None.

    Each distinct host is resolved once, ``resolver_threads`` at a time.
    """
    parsed: list[tuple[str, int] | str] = [_host_and_port(url) for url in urls]
    hosts = sorted({item[0] for item in parsed if isinstance(item, tuple)})
    with ThreadPoolExecutor(max(1, resolver_threads)) as pool:
        resolved = dict(zip(hosts, pool.map(_resolve, hosts)))
    reasons: list[str | None] = []
    for item in parsed:
        if isinstance(item, str):
            reasons.append(item)
            continue
        addresses = resolved[item[0]]
        reasons.append(addresses if isinstance(addresses, str) else policy.refusal(*item, addresses))
    return reasons


def _host_and_port(url: str | None) -> tuple[str, int] | str:
    """``(host, port)`` of an http(s) URL, or why the URL is not fetchable."""
    if not url:
        return "invalid url: empty"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        return f"invalid url: {error}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"scheme not allowed: {parts.scheme or 'none'}"
    if not parts.hostname:
        return "invalid url: no host"
    return parts.hostname, port or (443 if parts.scheme.lower() == "https" else 80)


# ------------------------------------------------------------------------------------------- guarded urllib


def _check_before_connect(connection: http.client.HTTPConnection, policy: AddressPolicy) -> None:
    """Refuse before any packet reaches a forbidden address (e.g. a redirect to an internal service)."""
    addresses = _resolve(connection.host)
    if isinstance(addresses, str):
        raise OSError(addresses)
    reason = policy.refusal(connection.host, connection.port, addresses)
    if reason is not None:
        raise ConnectionRefusedError(reason)


def _check_peer(sock: socket.socket, host: str, port: int, policy: AddressPolicy) -> None:
    """Refuse a connected socket whose peer the policy forbids (DNS answers may change between check and
    connect); the caller closes it."""
    address = sock.getpeername()[0]
    reason = policy.refusal(host, port, (address,))
    if reason is not None:
        raise ConnectionRefusedError(reason)


class _Guarded:
    """Mixed into an ``http.client`` connection class: the policy is checked before connecting and on the
    peer of the TCP connection as soon as it exists, before https's TLS handshake (whose ClientHello would
    already send bytes, the server name included, to the peer) and before any request byte."""

    def __init__(self, *args, policy: AddressPolicy, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.policy = policy
        self._create_connection = self._create_checked_connection  # http.client's hook for the TCP connect

    def _create_checked_connection(self, address: tuple[str, int], *args, **kwargs) -> socket.socket:
        sock = socket.create_connection(address, *args, **kwargs)
        try:
            _check_peer(sock, self.host, self.port, self.policy)
        except ConnectionRefusedError:
            sock.close()
            raise
        return sock

    def connect(self) -> None:
        _check_before_connect(self, self.policy)
        super().connect()


class _GuardedHTTPConnection(_Guarded, http.client.HTTPConnection):
    pass


class _GuardedHTTPSConnection(_Guarded, http.client.HTTPSConnection):
    pass


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__()
        self.policy = policy

    def http_open(self, req: urllib.request.Request):
        return self.do_open(_GuardedHTTPConnection, req, policy=self.policy)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__()
        self.policy = policy

    def https_open(self, req: urllib.request.Request):
        return self.do_open(_GuardedHTTPSConnection, req, context=self._context, policy=self.policy)


class _HttpOnlyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; a crawl must only ever fetch http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https", ""):
            raise urllib.error.HTTPError(newurl, code, f"redirect to scheme {scheme!r} refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def guarded_opener(policy: AddressPolicy) -> urllib.request.OpenerDirector:
    """A urllib opener that only connects to addresses ``policy`` allows, follows only http(s) redirects and
    ignores proxy environment variables (a proxy's address would hide the target's)."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        _GuardedHTTPHandler(policy),
        _GuardedHTTPSHandler(policy),
        _HttpOnlyRedirectHandler(),
    )
