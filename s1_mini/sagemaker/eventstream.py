"""Encoder for AWS event stream messages (``application/vnd.amazon.eventstream``), the
framing in which SageMaker returns ``InvokeEndpointWithResponseStream`` results.

A message is: total length (u32 BE), headers length (u32 BE), CRC32 of those 8 bytes,
the headers, the payload, and the CRC32 of everything before it. A header is: name
length (u8), name, value type (u8; 7 is a string), value length (u16 BE), value.

The event shapes follow botocore's ``sagemaker-runtime`` service model (rest-json):
``ResponseStream`` is a union of the event ``PayloadPart`` (its one member ``Bytes`` is
an ``eventpayload`` blob, so the message payload *is* the bytes) and the exceptions
``ModelStreamError {Message, ErrorCode}`` and ``InternalStreamFailure {Message}``,
whose members travel as a JSON payload.
"""

from __future__ import annotations

import json
import struct
import zlib

CONTENT_TYPE = "application/vnd.amazon.eventstream"

# Limits of the AWS event stream format; botocore's reader refuses messages above them.
MAX_HEADERS_BYTES = 128 * 1024
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024

_STRING_VALUE = 7
_PRELUDE = struct.Struct(">II")
_CRC = struct.Struct(">I")
_PRELUDE_AND_CRCS = _PRELUDE.size + 2 * _CRC.size


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One event stream message with string-valued ``headers`` (in the given order)."""
    encoded_headers = b"".join(_encode_header(name, value) for name, value in headers.items())
    if len(encoded_headers) > MAX_HEADERS_BYTES:
        raise ValueError(f"event stream headers take {len(encoded_headers)} bytes; the limit is {MAX_HEADERS_BYTES}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"event stream payload of {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    prelude = _PRELUDE.pack(_PRELUDE_AND_CRCS + len(encoded_headers) + len(payload), len(encoded_headers))
    message = prelude + _CRC.pack(zlib.crc32(prelude)) + encoded_headers + payload
    return message + _CRC.pack(zlib.crc32(message))


def payload_part(data: bytes) -> bytes:
    """A ``PayloadPart`` event carrying ``data`` as its ``Bytes``."""
    return encode_message(
        {":message-type": "event", ":event-type": "PayloadPart", ":content-type": "application/octet-stream"}, data)


def exception_event(exception_type: str, members: dict[str, str]) -> bytes:
    """An exception message of the ``ResponseStream`` union (``ModelStreamError``,
    ``InternalStreamFailure``); botocore raises it as ``EventStreamError`` while iterating."""
    return encode_message(
        {":message-type": "exception", ":exception-type": exception_type, ":content-type": "application/json"},
        json.dumps(members).encode("utf-8"))


def model_stream_error(message: str, error_code: str) -> bytes:
    """A ``ModelStreamError``; SageMaker's error codes are ``StreamBroken`` and
    ``ModelInvocationTimeExceeded``."""
    return exception_event("ModelStreamError", {"Message": message, "ErrorCode": error_code})


def _encode_header(name: str, value: str) -> bytes:
    name_bytes, value_bytes = name.encode("utf-8"), value.encode("utf-8")
    if not 0 < len(name_bytes) < 256:
        raise ValueError(f"event stream header name {name!r} must take 1 to 255 bytes")
    if len(value_bytes) > 0x7FFF:
        raise ValueError(f"event stream header {name!r} has a value of {len(value_bytes)} bytes; the limit is 32767")
    return (struct.pack(">B", len(name_bytes)) + name_bytes
            + struct.pack(">BH", _STRING_VALUE, len(value_bytes)) + value_bytes)
