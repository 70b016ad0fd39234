"""Finding a Conclave cluster on the LAN by DNS-SD over mDNS (the `zeroconf` package), for `conclave join`
without an address.

The broker's machine (`conclave serve`) advertises one service of type `_conclave._tcp.local.`: the instance
is the cluster's name (operator-chosen, default the hostname), the port is the broker's NATS port, the
addresses are the advertising host's IPv4 addresses, and the TXT record holds `v=1`, `name=`, `cluster=`
(the cluster id, hex), `ca=` (sha256 hex of the cluster CA certificate) and optionally `http=` (the HTTP
port). All of it is public: the CA fingerprint lets a joiner check an advert against its token, so a rogue
advert cannot redirect it to another broker (the TLS handshake with the token's CA is what then proves it).

A joiner browses for a few seconds, keeps every advert seen (one per cluster id), and `choose_cluster`
picks the one its token names, or says clearly that there is none or several. Multicast is a convenience:
where it is blocked (routed networks, many Wi-Fi access points, cloud VPCs), `conclave join ADDRESS` works.

Two flavours: `advertise_async`/`browse_async` run on the caller's event loop (`conclave serve` is asyncio);
`advertise` runs zeroconf on a thread of its own and `browse` runs its own loop (asyncio.run), so neither
may be called from a thread whose event loop is running.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import psutil
import msgspec
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

SERVICE_TYPE = "_conclave._tcp.local."
VERSION = "1"  # the TXT record's `v`: adverts of another version are ignored, not misread
JOIN_HINT = "conclave join ADDRESS --token ..."


class Advert(msgspec.Struct, frozen=True):
    """One cluster as the LAN sees it: where its broker listens and which CA it uses."""

    name: str
    cluster_id: str  # hex
    port: int  # the broker's NATS port
    addresses: tuple[str, ...] = ()  # IPv4; empty: every non-loopback IPv4 address of this host
    ca: str = ""  # sha256 hex of the cluster CA certificate
    http_port: int | None = None

    def describe(self) -> str:
        where = ", ".join(f"{a}:{self.port}" for a in self.addresses) or f"port {self.port}"
        return f"{self.name} (cluster {self.cluster_id}) at {where}"


class DiscoveryError(Exception):
    """No single cluster to join; the message says what was found and what the operator can do."""


def host_addresses(interfaces: Sequence[str] | None = None) -> list[str]:
    """The IPv4 addresses to advertise: `interfaces` itself when given (addresses to bind mDNS to), else
    every non-loopback IPv4 address of this host."""
    if interfaces:
        return list(interfaces)
    found = [a.address for addresses in psutil.net_if_addrs().values() for a in addresses if a.family == socket.AF_INET]
    return [a for a in dict.fromkeys(found) if not a.startswith("127.")]


def _zeroconf_args(interfaces: Sequence[str] | None) -> dict:
    # IPv4 only: the advert carries IPv4 addresses, and an IPv6 socket per interface is one more thing
    # that fails in odd setups (no IPv6 in a container, DAD still running on a fresh link).
    return {"interfaces": list(interfaces) if interfaces else InterfaceChoice.All, "ip_version": IPVersion.V4Only}


def service_info(advert: Advert, interfaces: Sequence[str] | None = None) -> ServiceInfo:
    if not advert.name or len(advert.name.encode()) > 63 or "." in advert.name:
        raise ValueError(f"a cluster name is 1 to 63 bytes without dots (one DNS label), not {advert.name!r}")
    try:
        int(advert.cluster_id, 16)
    except ValueError:
        raise ValueError(f"a cluster id is hex, not {advert.cluster_id!r}") from None
    properties = {"v": VERSION, "name": advert.name, "cluster": advert.cluster_id, "ca": advert.ca}
    if advert.http_port is not None:
        properties["http"] = str(advert.http_port)
    # The host name is shared by every service of this host; each Conclave advert needs its A records,
    # so they hang off a name of the cluster's own rather than the hostname avahi may already answer for.
    server = f"conclave-{advert.cluster_id[:12]}.local."
    return ServiceInfo(SERVICE_TYPE, f"{advert.name}.{SERVICE_TYPE}", port=advert.port, properties=properties,
                       server=server, parsed_addresses=list(advert.addresses) or host_addresses(interfaces))


class Advertising:
    """A registered advert (from `advertise`); `close()` says goodbye on the LAN and stops zeroconf."""

    def __init__(self, zc: Zeroconf, info: ServiceInfo) -> None:
        self.zc, self.info = zc, info

    def close(self) -> None:
        self.zc.unregister_service(self.info)
        self.zc.close()

    def __enter__(self) -> Advertising:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncAdvertising:
    """A registered advert (from `advertise_async`); `await close()` says goodbye and stops zeroconf."""

    def __init__(self, azc: AsyncZeroconf, info: ServiceInfo) -> None:
        self.azc, self.info = azc, info

    async def close(self) -> None:
        await self.azc.async_unregister_service(self.info)
        await self.azc.async_close()

    async def __aenter__(self) -> AsyncAdvertising:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def advertise(advert: Advert, interfaces: Sequence[str] | None = None) -> Advertising:
    """Advertise `advert` until `close()` (zeroconf's own thread). Returns once the name is probed and
    announced (about a second). A name another host already uses is renamed ("name (2)"); the TXT `name`
    keeps the operator's."""
    zc = Zeroconf(**_zeroconf_args(interfaces))
    try:
        info = service_info(advert, interfaces)
        zc.register_service(info, allow_name_change=True)
    except BaseException:
        zc.close()
        raise
    return Advertising(zc, info)


async def advertise_async(advert: Advert, interfaces: Sequence[str] | None = None) -> AsyncAdvertising:
    """`advertise` on the running event loop."""
    azc = AsyncZeroconf(**_zeroconf_args(interfaces))
    try:
        info = service_info(advert, interfaces)
        await (await azc.async_register_service(info, allow_name_change=True))
    except BaseException:
        await azc.async_close()
        raise
    return AsyncAdvertising(azc, info)


def parse_info(info: ServiceInfo) -> Advert | None:
    """The advert a resolved service carries, or None for one that is not a Conclave advert of this version."""
    txt = info.decoded_properties
    cluster = txt.get("cluster") or ""
    if txt.get("v") != VERSION or not cluster or info.port is None:
        return None
    try:
        int(cluster, 16)
        http_port = int(txt["http"]) if txt.get("http") else None
    except ValueError:
        return None
    name = txt.get("name") or info.name.removesuffix("." + SERVICE_TYPE)
    return Advert(name=name, cluster_id=cluster.lower(), port=info.port, ca=(txt.get("ca") or "").lower(),
                  addresses=tuple(info.parsed_addresses(IPVersion.V4Only)), http_port=http_port)


def merge(adverts: Sequence[Advert]) -> list[Advert]:
    """One advert per cluster (id and CA: an advert copying a cluster's public id with another CA stays apart, and is
    dropped when a token names the CA), with the addresses of all of them."""
    by_id: dict[tuple[str, str], Advert] = {}
    for advert in adverts:
        key = (advert.cluster_id, advert.ca)
        seen = by_id.get(key)
        by_id[key] = advert if seen is None else msgspec.structs.replace(
            seen, addresses=tuple(dict.fromkeys(seen.addresses + advert.addresses)))
    return list(by_id.values())


async def browse_async(timeout_s: float = 3.0, interfaces: Sequence[str] | None = None) -> list[Advert]:
    """Every cluster that answered within `timeout_s` (the whole time is waited: several may answer)."""
    azc = AsyncZeroconf(**_zeroconf_args(interfaces))
    resolving: list[asyncio.Task] = []

    async def resolve(name: str) -> Advert | None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        # The answer to the browse query normally carries SRV, TXT and A along: then this is a cache read.
        if await info.async_request(azc.zeroconf, timeout_s * 1000):
            return parse_info(info)
        return None

    def on_change(zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            resolving.append(asyncio.ensure_future(resolve(name)))

    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    try:
        await asyncio.sleep(timeout_s)
        if resolving:  # a service seen at the last moment gets a short grace to resolve
            await asyncio.wait(resolving, timeout=min(1.0, timeout_s))
    finally:
        for task in resolving:
            task.cancel()
        await browser.async_cancel()
        await azc.async_close()
    done = [t.result() for t in resolving if t.done() and not t.cancelled() and t.exception() is None]
    return merge([a for a in done if a is not None])


def browse(timeout_s: float = 3.0, interfaces: Sequence[str] | None = None) -> list[Advert]:
    """`browse_async` on an event loop of its own (not from a thread whose loop is running)."""
    return asyncio.run(browse_async(timeout_s, interfaces))


def choose_cluster(found: Sequence[Advert], token_ca: str | None = None, waited_s: float = 3.0) -> Advert:
    """The one cluster to join among those `browse` found: with `token_ca` (the CA fingerprint a join token
    names), only a cluster with that CA. Raises DiscoveryError saying what was found otherwise."""
    found = merge(found)
    if not found:
        raise DiscoveryError(f"no Conclave cluster answered on the LAN by mDNS within {waited_s:g}s; multicast "
                             f"may be blocked: give the first machine's address: {JOIN_HINT}")
    listing = "".join(f"\n  {a.describe()}" for a in found)
    if token_ca is not None:
        matching = [a for a in found if a.ca.lower() == token_ca.lower()]
        if not matching:
            raise DiscoveryError(f"{len(found)} Conclave cluster(s) answered on the LAN by mDNS, but none is the "
                                 f"token's (its CA differs):{listing}\ngive the first machine's address: {JOIN_HINT}")
        found = matching
        listing = "".join(f"\n  {a.describe()}" for a in found)
    if len(found) > 1:
        raise DiscoveryError(f"several Conclave clusters answered on the LAN by mDNS:{listing}\npass one's "
                             f"address: {JOIN_HINT}")
    return found[0]


def default_cluster_name() -> str:
    """The default cluster name: this host's name, first label only (mDNS names live under .local)."""
    return socket.gethostname().split(".")[0] or "conclave"
