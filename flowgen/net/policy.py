"""Which destinations flowgen may connect to: public internet addresses, plus what the operator allows.

A URL from a request (a reference image, a webhookURL, an uploadEndpoint) must not reach what only
this machine can reach: loopback, link-local (169.254.169.254 answers cloud credentials), private
and shared ranges, 0.0.0.0, unique-local and multicast IPv6, or IPv6 forms that embed one of them.
The check is made on the address a connection is about to be opened to, after DNS resolution, on
every hop of a redirect (flowgen.net.transport), so a name that resolves to 127.0.0.1, or that
resolves differently the second time (DNS rebinding), is refused the same way.

The operator opens named hosts or ranges with $FLOWGEN_ALLOW_HOSTS (and `flowgen serve
--allow-host`): a comma-separated list of host names (`minio`, `*.corp.example`), addresses
(`127.0.0.1`, `::1`) and CIDR ranges (`10.0.0.0/8`). A name allows that name wherever it resolves;
an address or range allows any host name that resolves into it.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flowgen.errors import FlowgenError

ALLOW_ENV = "FLOWGEN_ALLOW_HOSTS"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are an IPv4 address


class AllowListError(FlowgenError, ValueError):
    """An allow-list entry that is no host name, address or range (a user error: exit 2)."""


class DestinationRefused(Exception):
    """A connection flowgen will not open. The message names the host as the URL gave it and never
    what (if anything) answers there, so an open internal port reads like a closed one."""

    def __init__(self, host: str):
        super().__init__(
            f"{host}: no public address to connect to (flowgen connects only to public internet "
            f"addresses unless the operator allows the host: {ALLOW_ENV} or serve --allow-host)"
        )
        self.host = host


def is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address; IPv6 forms that embed an IPv4 address
    (::ffff:a.b.c.d, 6to4, NAT64) are judged by that address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified)


@dataclass(frozen=True)
class DestinationPolicy:
    """Public addresses, plus the operator's allowed `hosts` (lower-case names; "*.suffix" matches
    any name under suffix) and `networks`. `allow_all` turns the check off (tests of other things,
    or a caller that trusts every URL it is given)."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()
    allow_all: bool = False
    entries: tuple[str, ...] = field(default=(), compare=False)  # as the operator wrote them (messages)

    @classmethod
    def parse(cls, entries: Iterable[str], *, source: str = ALLOW_ENV) -> DestinationPolicy:
        """A policy allowing `entries` (names, addresses, CIDR ranges); AllowListError naming
        `source` and the entry for one that is none of those."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        kept: list[str] = []
        for raw in entries:
            for entry in (part.strip() for part in raw.split(",")):
                if not entry:
                    continue
                kept.append(entry)
                try:
                    networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                    continue
                except ValueError:
                    pass
                name = entry.lower().rstrip(".")
                label = name.removeprefix("*.")
                if not label or not all(
                    part and all(c.isalnum() or c in "-_" for c in part) for part in label.split(".")
                ):
                    raise AllowListError(
                        f"{source}: {entry!r} is not a host name, an IP address or a CIDR range "
                        "(e.g. minio, *.corp.example, 127.0.0.1, 10.0.0.0/8)"
                    )
                hosts.add(name)
        return cls(frozenset(hosts), tuple(networks), entries=tuple(kept))

    @classmethod
    def from_env(cls, extra: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> DestinationPolicy:
        """$FLOWGEN_ALLOW_HOSTS plus `extra` entries (serve's --allow-host)."""
        env = os.environ if environ is None else environ
        policy = cls.parse([env.get(ALLOW_ENV, "")])
        added = cls.parse(extra, source="--allow-host")
        return cls(policy.hosts | added.hosts, policy.networks + added.networks, entries=policy.entries + added.entries)

    def allows_name(self, host: str) -> bool:
        """Whether the operator allowed this host name (wherever it resolves)."""
        name = host.lower().rstrip(".")
        return (
            self.allow_all or name in self.hosts or any(h.startswith("*.") and name.endswith(h[1:]) for h in self.hosts)
        )

    def allows_address(self, address: IPAddress) -> bool:
        """Whether a connection to `address` may be opened (public, or in an allowed range)."""
        return (
            self.allow_all
            or is_public(address)
            or any(address in network for network in self.networks if network.version == address.version)
        )

    def literal_problem(self, host: str) -> str | None:
        """Why a URL's host is refused before any lookup (a literal address or `localhost` that is
        not allowed), else None: lets a request be refused at validation, not at delivery."""
        if self.allows_name(host):
            return None
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            name = host.lower().rstrip(".")
            return str(DestinationRefused(host)) if name == "localhost" or name.endswith(".localhost") else None
        return None if self.allows_address(address) else str(DestinationRefused(host))


ALLOW_ALL = DestinationPolicy(allow_all=True)
