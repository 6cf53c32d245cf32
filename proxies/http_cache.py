"""The HTTP proxy's in-memory object cache and what may go into it, without I/O.

Read first: RFC 7234 (HTTP/1.1 Caching) sections 3 ("Storing Responses in
Caches") and 5.2 (Cache-Control); RFC 1945 section 10.12 (Pragma) for 1.0.

Why the cache is filled out of band
-----------------------------------
With Symmetric TCP Splice the response to a miss never passes through the
proxy: the daemon relays it below the application (thesis 4.4, which points
to TCP tapping as the way to keep a copy). We have no tap, so after splicing a
cacheable miss the proxy fetches the same URL once more on a connection of
its own and stores that copy; the next request for it is a hit. This module
decides *whether* a request may be answered from / a response may be stored
in the cache and keeps the objects (LRU, bounded in bytes); the proxy's shell
does the fetching.

The cache is shared (one proxy, many clients), so responses that are private
to one user are never stored (RFC 7234 3 and 3.2). It does not revalidate, so
anything that asks for revalidation (``no-cache``) is not stored either, and
``max-age`` bounds how long an object is served (RFC 7234 5.2.2.8); without it
an object stays until it is evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# Response directives that forbid a shared cache to store (or, without
# revalidation, to reuse) the response: RFC 7234 5.2.2.2, 5.2.2.3, 5.2.2.6.
_FORBIDDING_DIRECTIVES = frozenset({"no-store", "private", "no-cache"})


def cache_directives(value: str | None) -> dict[str, str]:
    """A Cache-Control value as {directive: argument} (RFC 7234 5.2), names lower-cased."""
    directives: dict[str, str] = {}
    for item in (value or "").split(","):
        name, _, argument = item.strip().partition("=")
        if name:
            directives[name.strip().lower()] = argument.strip().strip('"')
    return directives


def request_is_cacheable(method: str, headers: dict[str, str]) -> bool:
    """May this request be answered from, and its response stored in, the cache?

    Only GET (the brief; RFC 7234 2 allows more). A request with
    Authorization is left alone: a shared cache must not store its response
    (RFC 7234 3.2), and serving it a stored object would skip the origin's
    access check. ``no-store``/``no-cache`` from the client mean: ask the origin.
    """
    if method != "GET" or "authorization" in headers:
        return False
    directives = cache_directives(headers.get("cache-control"))
    if "no-store" in directives or "no-cache" in directives:
        return False
    # RFC 7234 5.4: Pragma: no-cache is the HTTP/1.0 spelling of Cache-Control: no-cache.
    return "no-cache" not in headers.get("pragma", "").lower()


@dataclass(frozen=True, slots=True)
class StoreDecision:
    """Whether a response may be stored, and for how long (None: until evicted)."""

    store: bool
    reason: str
    max_age: float | None = None


def response_is_storable(status: int, headers: dict[str, str], max_object: int) -> StoreDecision:
    """RFC 7234 3, narrowed to what the proxy can serve back: a 200 with a known length."""
    if status != 200:
        return StoreDecision(False, f"status {status}")
    length = headers.get("content-length")
    if length is None or not length.isdigit():
        # Without Content-Length the proxy could not tell a complete body from
        # a connection cut short (HTTP/1.0 ends such bodies with the close).
        return StoreDecision(False, "no Content-Length")
    if int(length) > max_object:
        return StoreDecision(False, f"{length} bytes is over the object limit {max_object}")
    directives = cache_directives(headers.get("cache-control"))
    forbidden = sorted(_FORBIDDING_DIRECTIVES & directives.keys())
    if forbidden:
        return StoreDecision(False, f"Cache-Control: {', '.join(forbidden)}")
    if "no-cache" in headers.get("pragma", "").lower():
        return StoreDecision(False, "Pragma: no-cache")
    if headers.get("vary") is not None:
        # The key is the URL alone, so a response that varies with request
        # headers (RFC 7234 4.1) could be served to the wrong client.
        return StoreDecision(False, "Vary")
    if "set-cookie" in headers:
        return StoreDecision(False, "Set-Cookie")  # one user's state; not for everyone
    # s-maxage is the shared-cache override of max-age (RFC 7234 5.2.2.9).
    age = directives.get("s-maxage", directives.get("max-age"))
    max_age = float(age) if age is not None and age.isdigit() else None
    if max_age == 0:
        return StoreDecision(False, "max-age=0")
    return StoreDecision(True, "cacheable", max_age)


@dataclass(frozen=True, slots=True)
class CachedObject:
    body: bytes
    content_type: str | None
    expires: float | None  # monotonic seconds; None: until evicted

    def fresh(self, now: float) -> bool:
        return self.expires is None or now < self.expires


class ObjectCache:
    """URL -> object, least recently used evicted first, at most ``max_bytes`` of bodies.

    Not thread-safe: the proxy holds a lock around it.
    """

    def __init__(self, max_object: int, max_bytes: int) -> None:
        self.max_object = max_object
        self.max_bytes = max_bytes
        self.size = 0  # sum of the stored bodies' lengths
        self._objects: OrderedDict[str, CachedObject] = OrderedDict()

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, key: str) -> bool:
        return key in self._objects

    def keys(self) -> list[str]:
        """Least recently used first."""
        return list(self._objects)

    def get(self, key: str, now: float) -> CachedObject | None:
        """The fresh object for ``key`` (now most recently used), or None; stale ones go."""
        found = self._objects.get(key)
        if found is None:
            return None
        if not found.fresh(now):
            self._remove(key)
            return None
        self._objects.move_to_end(key)
        return found

    def put(self, key: str, obj: CachedObject) -> bool:
        """Store ``obj``, evicting the least recently used to fit; False if it can never fit."""
        size = len(obj.body)
        if size > self.max_object or size > self.max_bytes:
            return False
        if key in self._objects:
            self._remove(key)
        while self._objects and self.size + size > self.max_bytes:
            self._remove(next(iter(self._objects)))
        self._objects[key] = obj
        self.size += size
        return True

    def _remove(self, key: str) -> None:
        self.size -= len(self._objects.pop(key).body)
