"""How the SDKs' bodies arrive, undone into JSON bytes.

Server SDKs post JSON, plain or ``Content-Encoding: gzip``. Browser SDKs post
what a page can send without a CORS preflight: posthog-js sends gzip as
``text/plain`` (marked by nothing, or by ``?compression=gzip-js``) or
``data=<base64>`` form-encoded (``?compression=base64``); analytics.js and
RudderStack's beacon send JSON as ``text/plain``. Each form is bounded: at
most ``MAX_BODY_BYTES`` as sent and once decoded, and decompression is linear
in its input (a few gzip members at most; a body of thousands of empty members
is refused, not unpacked one member at a time).
"""

from __future__ import annotations

import base64
import binascii
import zlib
from urllib.parse import parse_qs

from sanic import Request

from core.settings import Settings
from service.errors import BadRequest, BodyTooLarge, UnsupportedMediaType

FORM = "application/x-www-form-urlencoded"
# posthog-js sends JSON as text/plain (sendBeacon), curl often sends no type
CONTENT_TYPES = ("application/json", "text/plain", "", FORM)
GZIP_MAGIC = b"\x1f\x8b"
# what a client sends is one gzip member; a few are allowed (gzip -c a b > c)
MAX_GZIP_MEMBERS = 16
COMPRESSIONS = ("gzip-js", "gzip", "base64")


def gunzip(data: bytes | memoryview, limit: int) -> bytes:
    """Decompress a gzip body, giving up as soon as it would exceed ``limit`` bytes.

    Memory stays bounded by the limit whatever the compression ratio (zip bombs),
    and time by the input's size: at most ``MAX_GZIP_MEMBERS`` members.
    """
    out = bytearray()
    view = memoryview(data)
    for _ in range(MAX_GZIP_MEMBERS):
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(view, limit + 1 - len(out))
        except zlib.error as exc:
            raise BadRequest(f"the body is not valid gzip ({exc})") from None
        if len(out) > limit:
            raise BodyTooLarge(f"the body may be at most {limit} bytes once decompressed")
        if not inflater.eof:
            raise BadRequest("the body is not valid gzip (it ends inside the compressed data)")
        # a gzip file may hold several members, and zero padding after them
        rest = inflater.unused_data.lstrip(b"\x00")
        if not rest:
            return bytes(out)
        view = memoryview(rest)
    raise BadRequest(f"the body holds more than {MAX_GZIP_MEMBERS} gzip members")


def unbase64(data: bytes, what: str) -> bytes:
    """Standard base64 (as btoa writes it), padding optional."""
    text = data.strip()
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64") from None


def form_data(body: bytes) -> bytes:
    """The ``data`` field of a form-encoded body (posthog-js: ``data=<base64 JSON>``)."""
    try:
        fields = parse_qs(body.decode("ascii"), max_num_fields=16, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the form body could not be parsed") from None
    values = fields.get("data")
    if not values:
        raise BadRequest("a form-encoded body needs a data field (base64 JSON)")
    return unbase64(values[0].encode("ascii", "replace"), "the data field")


def body_of(request: Request, settings: Settings, forms: bool = False) -> bytes:
    """The request body as JSON bytes: content type and encodings checked and undone.

    ``forms``: whether ``data=<base64>`` form bodies are taken (only posthog-js sends them).
    """
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type not in CONTENT_TYPES or (content_type == FORM and not forms):
        also = ", or form-encoded data=<base64>" if forms else ""
        raise UnsupportedMediaType(
            f"send the batch as JSON (application/json or text/plain) or gzip{also}"
        )
    body = request.body
    limit = settings.max_body_bytes
    if len(body) > limit:
        raise BodyTooLarge(f"the body may be at most {limit} bytes")
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        body = gunzip(body, limit)
    elif encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send gzip or no encoding"
        )
    compression = request.args.get("compression", "")
    if compression and compression not in COMPRESSIONS:
        raise UnsupportedMediaType(
            f"compression={compression!r} is not supported; use {', '.join(COMPRESSIONS)}"
        )
    if content_type == FORM:
        body = form_data(body)
    elif compression == "base64" and body[:2] != GZIP_MAGIC:
        body = unbase64(body, "the body")
    # posthog-js marks gzip by ?compression=gzip-js or by nothing: JSON never starts so
    if body[:2] == GZIP_MAGIC:
        body = gunzip(body, limit)
    elif compression.startswith("gzip"):
        raise BadRequest(f"compression={compression} but the body is not gzip")
    return body
