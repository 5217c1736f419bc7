"""client_address: who a request comes from, behind trusted reverse proxies or not."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from forwarder.http import client_address
from forwarder.http_config import HttpConfig

PROXIES = [ip_network("10.0.0.0/8"), ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        # no proxy configured or an untrusted peer: the header is the client's word
        ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),
        # one trusted proxy: the address it appended
        ("10.0.0.2", ["198.51.100.1"], "198.51.100.1"),
        # a client lying in the header: entries left of the real one are ignored
        ("10.0.0.2", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
        # two trusted proxies in a row, in one header or several
        ("10.0.0.2", ["198.51.100.1, 10.1.1.1"], "198.51.100.1"),
        ("10.0.0.2", ["6.6.6.6", "198.51.100.1", "10.1.1.1"], "198.51.100.1"),
        # IPv6 proxies and clients
        ("fd00::2", ["2001:db8::7"], "2001:db8::7"),
        # every hop trusted: the leftmost one
        ("10.0.0.2", ["10.9.9.9, 10.1.1.1"], "10.9.9.9"),
        # a trusted proxy that sent no header: itself
        ("10.0.0.2", [], "10.0.0.2"),
        # garbage appended by a proxy is not an address, so never trusted: it is the key
        ("10.0.0.2", ["198.51.100.1, not-an-ip"], "not-an-ip"),
        (None, ["198.51.100.1"], "unknown"),
    ],
)
def test_the_client_is_the_rightmost_untrusted_hop(
    peer: str | None, forwarded_for: list[str], client: str
) -> None:
    assert client_address(peer, forwarded_for, PROXIES) == client


def test_without_trusted_proxies_the_header_is_never_read() -> None:
    assert client_address("10.0.0.2", ["198.51.100.1"], []) == "10.0.0.2"


def test_trusted_proxies_are_networks_or_addresses_and_a_typo_is_named() -> None:
    config = HttpConfig(trusted_proxies=["10.0.0.0/8", "192.168.1.7", "fd00::/8"])
    assert [str(n) for n in config.trusted_proxies] == ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]
    with pytest.raises(ValueError, match="trusted_proxies"):
        HttpConfig(trusted_proxies=["10.0.0.0/33"])
