"""Reading `model` out of request bodies: JSON, multipart/form-data, gzip/deflate.

Parser agreement is the point: bbr must route on the model the model server will
read, so anything two parsers could read differently (duplicate keys, bad UTF-8,
lone surrogates) is refused rather than guessed. Only `model` is decoded; the rest
of the body is validated and skipped.
"""

from __future__ import annotations

import re
import zlib

import msgspec


class BodyError(ValueError):
    """The body cannot be read (answered 400 invalid_json)."""


class ModelError(ValueError):
    """The body reads, but its `model` is unusable (answered 400 invalid_model)."""


class TooLarge(ValueError):
    """The decompressed body is over the limit (answered 413)."""


_STR_DECODER = msgspec.json.Decoder(str)
_MODEL_KEY = b'"model"'
# \u escapes of the letters of "model" (d e l m o): the only way to spell the key
# other than literally.
_ESCAPED_LETTER = re.compile(rb"\\u006[4-9a-fA-F]")
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]')
_COLON = re.compile(rb"[ \t\r\n]*:")
_LONGEST_MODEL_KEY = 2 + 5 * 6  # "model" with every letter escaped
# A \uD800-\uDBFF escape (not itself escaped: an even run of backslashes before it)
# that no \uDC00-\uDFFF escape follows. Only searched once a body has failed to decode.
_LONE_HIGH_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)


# Top-level members with their values undecoded (Raw views into the body): `model` is
# decoded alone, and the raw lengths let _model_keys step over the rest.
_TOP_DECODER = msgspec.json.Decoder(dict[str, msgspec.Raw])
_KEY = re.compile(rb'[ \t\r\n]*("[^"\\]*(?:\\.[^"\\]*)*")[ \t\r\n]*:[ \t\r\n]*')
_AFTER_VALUE = re.compile(rb"[ \t\r\n]*([,}])")
# Below this size the whole-body screen is cheaper than walking the top level.
_WALK_FROM = 16 * 1024


def json_model(body: bytes) -> str | None:
    """The top-level `model` of a JSON object body; None when it has none."""
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise BodyError("request body is not valid UTF-8") from None
    try:
        doc = _TOP_DECODER.decode(body)
    except RecursionError:
        raise BodyError("request body is nested too deeply") from None
    except msgspec.ValidationError:
        raise BodyError("request body must be a JSON object") from None
    except msgspec.DecodeError as exc:
        if _LONE_HIGH_SURROGATE.search(body):
            # msgspec says "truncated" or "end of hex escape" for a high surrogate not
            # followed by a low one; say what is wrong, as for a lone low surrogate.
            raise BodyError("request body is not valid JSON: lone surrogate escape") from None
        raise BodyError(f"request body is not valid JSON: {_reason(exc)}") from None
    model = doc.get("model")
    if model is None:
        return None
    if len(body) < _WALK_FROM:
        repeated = _may_repeat_model(body) and _top_level_model_keys(body) > 1
    else:
        repeated = _model_keys(body, doc) > 1
    if repeated:
        raise BodyError("request body has more than one 'model' key")
    raw = bytes(model)
    if raw[0] != 0x22:  # '"'
        if raw == b"null":
            raise ModelError("'model' must be a string, not null")
        raise ModelError("'model' must be a string")
    return _STR_DECODER.decode(raw)


def _model_keys(body: bytes, doc: dict[str, msgspec.Raw]) -> int:
    """How many top-level keys decode to "model" (body already valid JSON).

    Walks the top level only: each member's value is skipped by the length of its raw
    value in `doc`, checked in place (a memcmp), so the body's bulk is never scanned.
    A repeated key whose first value differs from its last breaks the walk; then the
    whole-body screen and, if need be, the tokenising count decide.
    """
    pos = body.index(b"{") + 1
    count = 0
    while (key := _KEY.match(body, pos)) is not None:
        token = key.group(1)
        name = _STR_DECODER.decode(token) if b"\\" in token else token[1:-1].decode()
        if name == "model":
            count += 1
        value = doc.get(name)
        start = key.end()
        if value is None or not body.startswith(value, start):
            return _screened_count(body)
        after = _AFTER_VALUE.match(body, start + len(value))
        if after is None:
            return _screened_count(body)
        if after.group(1) == b"}":
            break
        pos = after.end()
    return count


def _screened_count(body: bytes) -> int:
    return _top_level_model_keys(body) if _may_repeat_model(body) else 1


def _reason(exc: msgspec.DecodeError) -> str:
    # msgspec's messages name a byte offset, never echo the input.
    return str(exc).removeprefix("JSON is malformed: ")


def _may_repeat_model(body: bytes) -> bool:
    """Cheap screen: could the body hold `model` as a key more than once?"""
    first = body.find(_MODEL_KEY)
    if first >= 0 and body.find(_MODEL_KEY, first + len(_MODEL_KEY)) < 0:
        return _ESCAPED_LETTER.search(body) is not None
    return True


def _top_level_model_keys(body: bytes) -> int:
    """How many top-level keys decode to "model" (body already valid JSON)."""
    depth = 0
    count = 0
    for match in _TOKEN.finditer(body):
        first = body[match.start()]
        if first in (0x7B, 0x5B):  # { [
            depth += 1
        elif first in (0x7D, 0x5D):  # } ]
            depth -= 1
        elif (
            depth == 1
            and match.end() - match.start() <= _LONGEST_MODEL_KEY
            and _COLON.match(body, match.end())
            and _STR_DECODER.decode(match.group()) == "model"
        ):
            count += 1
    return count


# --- multipart/form-data -------------------------------------------------------------

_NAME_PARAM = re.compile(r'(?i)(?:^|;)\s*name\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))')


def multipart_boundary(params: str) -> bytes | None:
    """The boundary parameter of a multipart Content-Type, or None."""
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.strip().lower() != "boundary":
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if 1 <= len(value) <= 200 and value.isascii() and value.isprintable():
            return value.encode("ascii")
        return None
    return None


def multipart_model(body: bytes, boundary: bytes) -> str | None:
    """The `model` form field of a multipart/form-data body; None when it has none."""
    delimiter = b"--" + boundary
    separator = b"\r\n" + delimiter
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:
        start = body.find(separator)
        if start < 0:
            raise BodyError("malformed multipart/form-data body: boundary not found")
        pos = start + len(separator)
    found: str | None = None
    while not body.startswith(b"--", pos):  # "--" after a delimiter closes the body
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise BodyError("malformed multipart/form-data body: bad delimiter line")
        headers_end = body.find(b"\r\n\r\n", line_end)
        if headers_end < 0:
            raise BodyError("malformed multipart/form-data body: unterminated part headers")
        value_start = headers_end + 4
        value_end = body.find(separator, value_start)
        if value_end < 0:
            raise BodyError("malformed multipart/form-data body: unterminated part")
        if _field_name(body[line_end + 2 : headers_end]) == "model":
            if found is not None:
                raise BodyError("multipart/form-data body has more than one 'model' field")
            try:
                found = body[value_start:value_end].decode("utf-8")
            except UnicodeDecodeError:
                raise BodyError("multipart 'model' field is not valid UTF-8") from None
        pos = value_end + len(separator)
    return found


def _field_name(headers: bytes) -> str | None:
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() != b"content-disposition":
            continue
        text = value.decode("utf-8", "replace")
        disposition, _, params = text.partition(";")
        if disposition.strip().lower() != "form-data":
            return None
        match = _NAME_PARAM.search(";" + params)
        if match is None:
            return None
        quoted, bare = match.groups()
        return quoted.replace('\\"', '"') if quoted is not None else bare
    return None


# --- content-encoding ----------------------------------------------------------------

DECOMPRESSORS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Inflate a gzip (any number of members) or zlib-format deflate body.

    Stops after `limit` bytes of output (TooLarge): a zip bomb costs at most that.
    """
    wbits = DECOMPRESSORS[encoding]
    parts: list[bytes] = []
    total = 0
    data = body
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            chunk = inflater.decompress(data, limit + 1 - total)
        except zlib.error as exc:
            raise BodyError(f"request body does not decompress as {encoding}: {exc}") from None
        total += len(chunk)
        if total > limit:
            raise TooLarge(encoding)
        parts.append(chunk)
        if not inflater.eof:
            raise BodyError(f"request body is truncated {encoding} data")
        data = inflater.unused_data
        if not data:
            break
        if encoding != "gzip":
            raise BodyError(f"request body has data after its {encoding} stream")
    return b"".join(parts) if len(parts) > 1 else parts[0]
