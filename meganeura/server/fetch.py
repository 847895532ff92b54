"""Remote image and video URLs (--allow-remote-media), fetched on the event loop so that a slow host
holds no worker thread:

- one deadline for all of a request's fetches (a host trickling a byte every few seconds is
  cut off at it, whatever the per-read timeouts);
- a bounded number of requests fetching at once; one more is refused at once (429);
- only public addresses, unless --allow-private-media-hosts: every hop (redirects too) is
  resolved here, checked, then connected to by that address (Host header and TLS SNI keep
  the name), so DNS cannot answer differently between the check and the connection;
- one message for every network failure, so that errors do not tell open ports from closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx

from .media import MediaError

MAX_REDIRECTS = 5


class FetchBusy(Exception):
    """Every remote-fetch slot is taken."""


def public(ip: str) -> bool:
    """A globally routable unicast address (IPv4-mapped IPv6 judged by its IPv4 address)."""
    address = ipaddress.ip_address(ip.partition("%")[0])  # drop an IPv6 scope ("fe80::1%eth0")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class RemoteFetcher:
    def __init__(self, allow: bool = False, allow_private: bool = False, max_bytes: int = 20 * 2**20,
                 timeout_s: float = 10.0, max_active: int = 8) -> None:
        self.allow, self.allow_private, self.max_bytes = allow, allow_private, max_bytes
        self.timeout_s, self.max_active = timeout_s, max_active
        self.active = 0  # requests fetching now; only touched on the event loop

    async def fetch(self, urls: list[str]) -> dict[str, bytes]:
        """The bytes behind each URL; raises MediaError (refused or failed) or FetchBusy."""
        if not self.allow:
            raise MediaError("remote URLs are not allowed on this server (it was started without "
                             "--allow-remote-media): send the image or video as a data: URL")
        if self.active >= self.max_active:
            raise FetchBusy(f"{self.max_active} requests are fetching remote images and videos already")
        self.active += 1
        try:
            return await asyncio.wait_for(self._fetch_all(urls), self.timeout_s)
        except asyncio.TimeoutError:
            raise MediaError(self._failed(urls[0] if len(urls) == 1 else "the remote media")) from None
        finally:
            self.active -= 1

    async def _fetch_all(self, urls: list[str]) -> dict[str, bytes]:
        async with httpx.AsyncClient(trust_env=False) as client:  # trust_env: no proxies from the environment
            return {url: await self._get(client, url) for url in dict.fromkeys(urls)}

    def _failed(self, url: str) -> str:
        return (f"cannot fetch {url[:200]}: no complete answer (unreachable, an error status, or not within "
                f"{self.timeout_s:g} s in all)")

    async def _get(self, client: httpx.AsyncClient, url: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                target = httpx.URL(url)
            except httpx.InvalidURL:
                raise MediaError(f"{url[:200]!r} is not a valid URL") from None
            if target.scheme not in ("http", "https") or not target.host:
                raise MediaError(f"refusing {url[:200]!r}: only http and https URLs with a host are fetched")
            name = target.raw_host.decode("ascii")  # IDNA-encoded
            address = await self._resolve(target, name)
            try:
                request = client.build_request(
                    "GET", target.copy_with(host=address), extensions={"sni_hostname": name},
                    headers={"Host": target.netloc.decode("ascii"), "Accept-Encoding": "identity"})  # no zip bombs
                response = await client.send(request, stream=True)
            except (httpx.HTTPError, httpx.InvalidURL):
                raise MediaError(self._failed(url)) from None
            try:
                if response.is_redirect:
                    url = str(target.join(response.headers["location"]))
                    continue
                if response.status_code != 200:
                    raise MediaError(self._failed(url))
                data = bytearray()
                async for piece in response.aiter_raw():
                    data += piece
                    if len(data) > self.max_bytes:
                        raise MediaError(f"{url[:200]}: larger than the limit of {self.max_bytes} bytes")
                return bytes(data)
            except (httpx.HTTPError, httpx.InvalidURL):
                raise MediaError(self._failed(url)) from None
            finally:
                await response.aclose()
        raise MediaError(f"{url[:200]}: more than {MAX_REDIRECTS} redirects")

    async def _resolve(self, url: httpx.URL, name: str) -> str:
        """The address to connect to, after checking every address the name resolves to."""
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            found = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise MediaError(self._failed(str(url))) from None
        addresses = [info[4][0] for info in found]
        if not self.allow_private and not all(map(public, addresses)):
            raise MediaError(f"refusing {name[:100]!r}: loopback, private, link-local and other non-public "
                             "addresses are not fetched (unless the server runs with --allow-private-media-hosts)")
        return addresses[0]
