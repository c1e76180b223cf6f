"""Strict request framing: the checks h11 does not make, against request smuggling.

A front proxy and this server must agree where each request ends; where two
parsers could disagree, the request is refused, the connection closed, and
nothing pipelined behind it is read (RFC 9112 §6.1, §6.3, §5.2, §2.2).
h11 (0.16) already refuses a request line without a version (HTTP/0.9),
two different ``Content-Length`` values, whitespace before a colon, and
transfer codings other than chunked (501).  It accepts, and this module
refuses:

* ``Content-Length`` together with ``Transfer-Encoding`` (h11 lets the
  latter win; a proxy may have used the former): 400;
* ``Transfer-Encoding`` in an HTTP/1.0 request: 400;
* a ``Transfer-Encoding`` value that is not exactly ``chunked``
  (``Chunked``: h11 lower-cases it, a proxy may not recognise it): 400;
* a line of the head ending in a bare LF instead of CRLF: 400;
* obs-fold (a header continued on a line starting with a space or tab),
  which h11 joins silently: 400;
* any version other than HTTP/1.0 and HTTP/1.1: 505.

The raw head is the start of h11's unprocessed buffer (its public
``trailing_data``) just before h11 turns it into a ``Request``: the server
peeks at it there (:func:`request_head`) and checks it once the request is
parsed (:func:`framing_problem`).  The per-request cost is one copy of a few
hundred bytes and a few ``bytes`` searches.

Nothing here does I/O or keeps state.
"""

from __future__ import annotations

import re

__all__ = ["request_head", "framing_problem"]

# h11 ends a head at the first empty line, with or without its CR.
_HEAD_END = re.compile(rb"\n\r?\n")
_VERSIONS = (b"1.1", b"1.0")


def request_head(buffered: bytes) -> bytes | None:
    """The complete request head at the start of ``buffered``, or None if it is incomplete."""
    end = buffered.find(b"\r\n\r\n")  # the usual case, faster than the regex
    if end >= 0 and b"\n\n" not in buffered[:end]:
        return buffered[: end + 4]
    found = _HEAD_END.search(buffered)
    return None if found is None else buffered[: found.end()]


def framing_problem(
    http_version: bytes, headers: list[tuple[bytes, bytes]], head: bytes | None
) -> tuple[int, str] | None:
    """``(status, reason)`` if the request must be refused, else None.

    ``headers`` are h11's (names lower-cased); ``head`` is the raw head h11
    parsed them from (None if it could not be seen: then only the parsed
    checks apply).
    """
    if http_version not in _VERSIONS:
        return 505, f"HTTP/{http_version.decode('ascii', 'replace')} is not supported"
    if head is not None:
        if head.count(b"\n") != head.count(b"\r\n"):
            return 400, "a line of the request head ends in a bare LF (CRLF is required)"
        if b"\n " in head or b"\n\t" in head:
            return 400, "obsolete line folding in a header"
    transfer_encoding = content_length = False
    for name, _ in headers:
        if name == b"transfer-encoding":
            transfer_encoding = True
        elif name == b"content-length":
            content_length = True
    if not transfer_encoding:
        return None
    if content_length:
        return 400, "both Content-Length and Transfer-Encoding"
    if http_version != b"1.1":
        return 400, "Transfer-Encoding in an HTTP/1.0 request"
    if head is not None and not _exactly_chunked(head):
        return 400, "Transfer-Encoding must be exactly 'chunked'"
    return None


def _exactly_chunked(head: bytes) -> bool:
    """Every raw Transfer-Encoding value is ``chunked`` (h11 already allows only one)."""
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.lower() == b"transfer-encoding" and value.strip(b" \t") != b"chunked":
            return False
    return True
