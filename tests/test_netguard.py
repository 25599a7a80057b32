"""The crawl's network policy against names, not just addresses: a host name that resolves to a loopback
address is refused like the address itself, and the peer actually connected is checked after connecting (the
DNS-rebinding defence), before any byte reaches it, over http and https. Real servers on 127.0.0.1, real
connections through ``guarded_opener``."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pipeline import netguard
from pipeline.netguard import AddressPolicy, guarded_opener, screen_urls
from tests.hostile_server import HostileServer, encode, smooth_image

# A public address (TEST-NET would be "reserved"): what a rebinding name answers at screening time.
PUBLIC = "93.184.216.34"


def test_localhost_resolves_to_loopback_here() -> None:
    """The premise of the tests below: ``localhost`` is a real name that resolves to 127.0.0.1 on this machine."""
    assert {info[4][0] for info in socket.getaddrinfo("localhost", None, proto=socket.IPPROTO_TCP)} & {
        "127.0.0.1",
        "::1",
    }


def test_a_name_that_resolves_to_loopback_is_refused_without_an_allow_entry() -> None:
    urls = ["http://localhost:8080/a.jpg", "https://LOCALHOST/b.jpg"]
    reasons = screen_urls(urls, AddressPolicy())
    assert all(r is not None and "refused loopback address" in r and "for localhost:" in r for r in reasons)
    # Entries for other hosts, other ports, or other networks do not admit it.
    policy = AddressPolicy.parse(["example.com", "localhost:9999", "10.0.0.0/8"])
    [reason] = screen_urls(["http://localhost:8080/a.jpg"], policy)
    assert reason is not None and reason.startswith("refused loopback address") and "localhost:8080" in reason
    # Its own entry (with the port fetched) does.
    assert screen_urls(["http://localhost:8080/a.jpg"], AddressPolicy.parse(["localhost:8080"])) == [None]


def test_guarded_opener_refuses_a_loopback_name_before_connecting() -> None:
    with HostileServer() as server:
        server.add("good", encode(smooth_image(1)))
        opener = guarded_opener(AddressPolicy())
        with pytest.raises(urllib.error.URLError, match="refused loopback address 127.0.0.1 for localhost"):
            opener.open(f"http://localhost:{server.port}/img/good", timeout=5)
        assert server.requests == []
        # The same server by its allow-listed name answers: the refusal above was the policy, not the server.
        allowed = guarded_opener(AddressPolicy.parse([f"localhost:{server.port}"]))
        assert allowed.open(f"http://localhost:{server.port}/img/good", timeout=5).read()


@pytest.fixture
def rebinding_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    """``localhost`` answers a public address to the policy's resolver (the screening answer a rebinding name
    gives) while the connection itself resolves it for real, to 127.0.0.1: the DNS answer changed between the
    check and the connect. Only the policy's lookup is replaced; the connection, the server and the peer are
    real."""
    real = netguard._resolve

    def first_answer(host: str) -> tuple[str, ...] | str:
        return (PUBLIC,) if host == "localhost" else real(host)

    monkeypatch.setattr(netguard, "_resolve", first_answer)


@pytest.mark.usefixtures("rebinding_localhost")
def test_rebinding_name_passes_screening_but_the_connected_peer_is_refused_over_http() -> None:
    assert screen_urls(["http://localhost:1/a.jpg"], AddressPolicy()) == [None]  # the screen is fooled
    with HostileServer() as server:
        server.add("good", encode(smooth_image(1)))
        with pytest.raises(urllib.error.URLError, match="refused loopback address 127.0.0.1 for localhost"):
            guarded_opener(AddressPolicy()).open(f"http://localhost:{server.port}/img/good", timeout=5)
        assert server.requests == []  # connected, checked, closed: no request byte was sent


@contextmanager
def _byte_counting_listener() -> Iterator[tuple[int, list[int]]]:
    """A TCP listener on 127.0.0.1 that accepts connections and counts the bytes each sends (it answers
    nothing and closes after a short silence)."""
    received: list[int] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                with connection:
                    connection.settimeout(1.0)
                    count = 0
                    try:
                        while chunk := connection.recv(4096):
                            count += len(chunk)
                    except (TimeoutError, OSError):
                        pass
                    received.append(count)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield listener.getsockname()[1], received
        finally:
            stop.set()
            thread.join(timeout=10)


@pytest.mark.usefixtures("rebinding_localhost")
def test_rebinding_name_over_https_is_refused_before_the_tls_handshake() -> None:
    """An https peer is checked on the TCP connection, before the TLS ClientHello (which would already carry
    bytes, the server name included, to the internal address)."""
    with _byte_counting_listener() as (port, received):
        with pytest.raises(urllib.error.URLError, match="refused loopback address 127.0.0.1 for localhost"):
            guarded_opener(AddressPolicy()).open(f"https://localhost:{port}/a.jpg", timeout=5)
        for _ in range(100):  # the listener records a connection once the client has closed it
            if received:
                break
            time.sleep(0.05)
    assert received == [0]
