"""URL screening, the allow-list, the guarded urllib opener and the image checks run before resizing."""

from __future__ import annotations

import io
import urllib.error

import numpy as np
import pytest
from PIL import Image

from pipeline.ingest import checked_image_bytes
from pipeline.netguard import AddressPolicy, guarded_opener, screen_urls
from tests.hostile_server import HostileServer, encode, hostile_bodies, odd_good_bodies, smooth_image


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://example.com/a.jpg", "scheme not allowed: ftp"),
        ("file:///etc/passwd", "scheme not allowed: file"),
        ("data:image/png;base64,AAAA", "scheme not allowed: data"),
        ("http:///nohost.jpg", "no host"),
        ("http://example.com:99999/a.jpg", "invalid url"),
        ("", "empty"),
        (None, "empty"),
        ("http://127.0.0.1/a.jpg", "loopback"),
        ("http://10.1.2.3/a.jpg", "private"),
        ("http://192.168.0.7:8080/a.jpg", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://224.0.0.1/a.jpg", "multicast"),
        ("http://0.0.0.0/a.jpg", "unspecified"),
        ("http://[::1]/a.jpg", "loopback"),
        ("http://[::ffff:10.0.0.1]/a.jpg", "private"),
        ("http://240.0.0.1/a.jpg", "reserved"),
    ],
)
def test_refused_urls_say_why(url, fragment):
    [reason] = screen_urls([url], AddressPolicy())
    assert reason is not None and fragment in reason


def test_public_addresses_pass():
    assert screen_urls(["http://8.8.8.8/a.jpg", "https://[2606:4700::1111]/b.png"], AddressPolicy()) == [
        None,
        None,
    ]


def test_allow_list_entries_match_host_port_and_cidr():
    policy = AddressPolicy.parse(["127.0.0.1:8765", "10.0.0.0/8", "[::1]:9000"])
    urls = [
        "http://127.0.0.1:8765/a.jpg",
        "http://127.0.0.1:8766/a.jpg",
        "http://10.200.3.4/a.jpg",
        "http://192.168.1.1/a.jpg",
        "http://[::1]:9000/a.jpg",
        "http://[::1]:9001/a.jpg",
    ]
    allowed = [reason is None for reason in screen_urls(urls, policy)]
    assert allowed == [True, False, True, False, True, False]


def test_allow_list_by_host_name():
    policy = AddressPolicy.parse(["localhost"])
    assert screen_urls(["http://localhost:1234/a.jpg", "http://127.0.0.1:1234/a.jpg"], policy)[0] is None
    assert screen_urls(["http://127.0.0.1:1234/a.jpg"], policy)[0] is not None


@pytest.mark.parametrize("entry", ["", "a/b/c", "10.0.0.0/33", "host:port"])
def test_bad_allow_entries_raise(entry):
    if entry == "":
        assert AddressPolicy.parse([entry]).allowed == ()
        return
    with pytest.raises(ValueError):
        AddressPolicy.parse([entry])


def test_guarded_opener_fetches_allowed_and_refuses_redirects_elsewhere():
    good = encode(smooth_image(1))
    with HostileServer() as allowed, HostileServer() as internal:
        allowed.add("good", good)
        internal.add("good", good)
        opener = guarded_opener(AddressPolicy.parse([f"127.0.0.1:{allowed.port}"]))
        assert opener.open(allowed.url("img/good"), timeout=5).read() == good
        with pytest.raises(urllib.error.URLError, match="refused loopback address"):
            opener.open(allowed.url(f"redirect/{internal.port}"), timeout=5)
        with pytest.raises(urllib.error.HTTPError, match="redirect to scheme 'ftp' refused"):
            opener.open(allowed.url("to-ftp"), timeout=5)
        with pytest.raises(urllib.error.URLError, match="refused loopback address"):
            opener.open(internal.url("img/good"), timeout=5)
    # The refusal happens before connecting: the internal server never saw a request.
    assert internal.requests == []
    assert allowed.requests.count(f"/redirect/{internal.port}") == 1


def test_image_checks_reject_hostile_bodies_with_reasons():
    bodies = hostile_bodies()
    reasons = {name: checked_image_bytes(data, 89_478_485)[1] for name, data in bodies.items()}
    assert "truncated" in reasons["truncated.jpg"]
    assert reasons["page.jpg"] == reasons["empty.jpg"] == "not an image (unidentified format)"
    assert reasons["huge.png"].startswith("image too large")
    assert reasons["one-pixel.png"] is None  # valid; img2dataset's min_image_size rejects it later
    assert checked_image_bytes(encode(smooth_image(3), quality=80), 100)[1] == "image too large: 96x72 pixels"


def test_image_checks_keep_jpeg_bytes_and_normalise_cmyk_and_16_bit():
    jpeg = encode(smooth_image(4), quality=85)
    assert checked_image_bytes(jpeg, 10**8) == (jpeg, None)
    odd = odd_good_bodies()
    for name in ("cmyk.jpg", "sixteen-bit.png"):
        data, reason = checked_image_bytes(odd[name], 10**8)
        assert reason is None
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.mode in ("L", "RGB"), (name, image.mode)
    sixteen = np.asarray(Image.open(io.BytesIO(odd["sixteen-bit.png"])))
    eight = np.asarray(Image.open(io.BytesIO(checked_image_bytes(odd["sixteen-bit.png"], 10**8)[0])))
    np.testing.assert_array_equal(eight, (sixteen >> 8).astype(np.uint8))
    rgba = odd["alpha.png"]
    assert checked_image_bytes(rgba, 10**8) == (rgba, None)  # img2dataset's resizer mattes alpha itself
