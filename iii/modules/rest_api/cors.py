"""CORS for the REST port: which origins and methods, and the headers that say so.

Config (spec modules.md §1): no ``cors`` block means permissive (any origin,
any method, any header); with a block, ``allowed_origins`` empty or holding
``"*"`` means any origin, ``allowed_methods`` empty means any method.
Request headers are always allowed.

A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
is answered here for every path, before routing.  An origin or method outside
the lists gets a 403 that says which, instead of a silent answer without the
allow headers.  Pure: no I/O.  Lifetime: built once with the module from its
config.
"""

from __future__ import annotations

import attrs

__all__ = ["CorsPolicy", "PreflightVerdict"]

ANY = b"*"


@attrs.frozen
class PreflightVerdict:
    allowed: bool
    headers: list[tuple[bytes, bytes]]
    reason: str = ""


@attrs.frozen
class CorsPolicy:
    origins: frozenset[str] | None = None  # None: any origin
    methods: frozenset[str] | None = None  # None: any method

    @classmethod
    def from_lists(cls, origins: tuple[str, ...], methods: tuple[str, ...]) -> CorsPolicy:
        any_origin = not origins or "*" in origins
        any_method = not methods or "*" in methods
        return cls(
            origins=None if any_origin else frozenset(o.rstrip("/") for o in origins),
            methods=None if any_method else frozenset(m.upper() for m in methods),
        )

    def _allow_origin(self, origin: bytes) -> list[tuple[bytes, bytes]] | None:
        if self.origins is None:
            return [(b"access-control-allow-origin", ANY)]
        if origin.decode("latin-1").rstrip("/") in self.origins:
            return [(b"access-control-allow-origin", origin), (b"vary", b"origin")]
        return None

    def response_headers(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """Headers for an ordinary (non-preflight) response to a request from ``origin``."""
        if origin is None:
            return []
        allow = self._allow_origin(origin)
        if allow is None:
            return []
        return [*allow, (b"access-control-expose-headers", ANY)]

    def preflight(
        self, origin: bytes, method: bytes, request_headers: bytes | None
    ) -> PreflightVerdict:
        allow = self._allow_origin(origin)
        if allow is None:
            return PreflightVerdict(False, [], f"origin {origin.decode('latin-1')} is not allowed")
        wanted = method.decode("latin-1").strip().upper()
        if self.methods is not None and wanted not in self.methods:
            return PreflightVerdict(False, [], f"method {wanted} is not allowed")
        headers = [
            *allow,
            (b"access-control-allow-methods", wanted.encode("latin-1")),
            (b"access-control-max-age", b"600"),
        ]
        if request_headers:
            headers.append((b"access-control-allow-headers", request_headers))
        if self.origins is not None:
            headers.append(
                (b"vary", b"access-control-request-method, access-control-request-headers")
            )
        return PreflightVerdict(True, headers)
