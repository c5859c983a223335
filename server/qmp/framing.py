"""QMP framing: an incremental parser for a stream of JSON values, and the encoder for output lines.

Sans-I/O (bytes in, messages out), modelled on QEMU's JSON lexer + streamer + parser so that clients
see the same behaviour as with qemu-storage-daemon 7.2 (checked by running the same byte streams
against it):

- No newline is required between values (qemu.qmp sends none); a value ends when its closing bracket
  balances the ones it opened, or at once for a top-level scalar.
- QEMU's extension: ``'single-quoted'`` strings, and the ``\\'`` escape in both kinds of string.
- A lexical error (a stray byte, a control character inside a string, a malformed number) is reported
  as ``JSON parse error, stray '...'`` and drops the value being collected; the lexer then skips input
  until a structural character (``{ } [ ] : ,``, kept) or a control character or ``\\xfe``/``\\xff``
  (dropped) — the resynchronisation the QMP spec describes ("Forcing the JSON parser into known-good
  state").
- Grammar errors get QEMU's messages ("expecting value", "expected separator in dict", ...).
- Bounded input: a value may not exceed 64 MiB of tokens, 2 Mi tokens or a nesting depth of 1024
  (QEMU's limits, with its messages); the collected tokens are dropped when a limit is hit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_NESTING",
    "MAX_TOKEN_COUNT",
    "MAX_TOKEN_SIZE",
    "JsonError",
    "JsonStreamParser",
    "JsonValue",
    "Message",
    "encode",
]

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1024
#: How much of an offending token a "stray" error message quotes (QEMU quotes all of it).
MAX_STRAY_QUOTE = 256

INT64_MIN = -(1 << 63)
UINT64_MAX = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class JsonValue:
    """One complete top-level JSON value (not necessarily an object: the dispatcher checks)."""

    value: Any


@dataclass(frozen=True, slots=True)
class JsonError:
    """Input that did not parse; ``desc`` is QEMU's message. The offending bytes are gone."""

    desc: str


Message = JsonValue | JsonError

# Token kinds.
LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA, STRING, NUMBER, KEYWORD = range(9)

_STRUCTURAL = {
    ord("{"): LCURLY,
    ord("}"): RCURLY,
    ord("["): LSQUARE,
    ord("]"): RSQUARE,
    ord(":"): COLON,
    ord(","): COMMA,
}
_WS = re.compile(rb"[ \t\r\n]*")
_BODY = {
    ord('"'): re.compile(rb'(?:[^"\\\x00-\x1f\xfe\xff]+|\\[^\x00-\x1f\xfe\xff])*'),
    ord("'"): re.compile(rb"(?:[^'\\\x00-\x1f\xfe\xff]+|\\[^\x00-\x1f\xfe\xff])*"),
}
_KEYWORD_RUN = re.compile(rb"[a-z]*")
_NUMBER_RUN = re.compile(rb"[0-9eE.+\-]*")
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_IS_FLOAT = re.compile(rb"[.eE]")
_RECOVERY_END = re.compile(rb"[\x00-\x08\x0a-\x1f\xfe\xff{}\[\]:,]")
_BACKSLASH = ord("\\")
_DIGITS_AND_MINUS = frozenset(b"-0123456789")
_LOWER = frozenset(b"abcdefghijklmnopqrstuvwxyz")


class _ParseFailure(Exception):
    pass


class JsonStreamParser:
    """Feed bytes as they arrive; get back the complete messages (values or errors) in order."""

    def __init__(
        self,
        *,
        max_size: int = MAX_TOKEN_SIZE,
        max_tokens: int = MAX_TOKEN_COUNT,
        max_nesting: int = MAX_NESTING,
    ) -> None:
        self.max_size = max_size
        self.max_tokens = max_tokens
        self.max_nesting = max_nesting
        self._buf = bytearray()
        self._pos = 0  # next byte to lex
        self._recovering = False
        # A multi-byte token in progress: its kind, where it starts in _buf (scanning resumes at _pos).
        self._partial: int | None = None
        self._tok_start = 0
        # The value being collected (QEMU's streamer): token kinds, their raw bytes, and counters.
        self._kinds: list[int] = []
        self._raws: list[bytes | None] = []
        self._size = 0
        self._braces = 0
        self._brackets = 0

    @property
    def pending(self) -> int:
        """Bytes held for an unfinished value (for tests and diagnostics)."""
        return self._size + len(self._buf) - (self._tok_start if self._partial is not None else self._pos)

    def feed(self, data: bytes) -> list[Message]:
        out: list[Message] = []
        buf = self._buf
        buf += data
        n = len(buf)
        pos = self._pos
        while pos < n:
            if self._recovering:
                m = _RECOVERY_END.search(buf, pos)
                if m is None:
                    pos = n
                    break
                pos = m.start()
                if buf[pos] not in _STRUCTURAL:
                    pos += 1  # control characters and \xfe/\xff are consumed
                self._recovering = False
                continue
            if self._partial is None:
                pos = _WS.match(buf, pos).end()  # type: ignore[union-attr]
                if pos >= n:
                    break
                c = buf[pos]
                kind = _STRUCTURAL.get(c)
                if kind is not None:
                    pos += 1
                    self._token(kind, None, 1, out)
                    continue
                if c in _BODY:
                    self._partial = STRING
                    self._tok_start = pos
                    pos += 1
                elif c in _DIGITS_AND_MINUS:
                    self._partial = NUMBER
                    self._tok_start = pos
                elif c in _LOWER:
                    self._partial = KEYWORD
                    self._tok_start = pos
                else:
                    pos += 1
                    self._lex_error(bytes(buf[pos - 1 : pos]), out)
                    continue
            pos = self._continue_token(buf, pos, out)
            if pos < 0:  # incomplete: wait for more input, resuming where the scan stopped
                pos = self._pos
                break
        # Drop what is consumed; keep the partial token.
        keep = self._tok_start if self._partial is not None else pos
        if keep:
            del buf[:keep]
            pos -= keep
            self._tok_start = 0
        self._pos = pos
        return out

    def _continue_token(self, buf: bytearray, pos: int, out: list[Message]) -> int:
        """Scan the partial token from ``pos``; return the position after it, or -1 if it needs more input."""
        n = len(buf)
        start = self._tok_start
        kind = self._partial
        if kind == STRING:
            quote = buf[start]
            end = _BODY[quote].match(buf, pos).end()  # type: ignore[union-attr]
            if end >= n or (buf[end] == _BACKSLASH and end + 1 >= n):
                return self._incomplete(end, out)
            self._partial = None
            if buf[end] == quote:
                self._token(STRING, bytes(buf[start : end + 1]), end + 1 - start, out)
                return end + 1
            bad_end = end + 2 if buf[end] == _BACKSLASH else end + 1
            self._lex_error(bytes(buf[start:bad_end]), out)
            return bad_end
        run = _NUMBER_RUN if kind == NUMBER else _KEYWORD_RUN
        end = run.match(buf, pos).end()  # type: ignore[union-attr]
        if end >= n:
            return self._incomplete(end, out)
        self._partial = None
        text = bytes(buf[start:end])
        if kind == NUMBER and not _NUMBER.fullmatch(text):
            self._lex_error(text, out)
        else:
            self._token(kind, text, len(text), out)  # type: ignore[arg-type]
        return end

    def _incomplete(self, scanned_to: int, out: list[Message]) -> int:
        self._pos = scanned_to
        if self._size + (scanned_to - self._tok_start) + 1 > self.max_size:
            # Too big even before it ends: drop it and what came before, resync after it.
            self._partial = None
            self._fail("JSON token size limit exceeded", out)
            self._recovering = True
            return len(self._buf)
        return -1

    def _lex_error(self, text: bytes, out: list[Message]) -> None:
        quoted = text[:MAX_STRAY_QUOTE].decode("utf-8", "replace")
        if len(text) > MAX_STRAY_QUOTE:
            quoted += "..."
        self._fail(f"JSON parse error, stray '{quoted}'", out)
        self._recovering = True

    def _fail(self, desc: str, out: list[Message]) -> None:
        out.append(JsonError(desc))
        self._reset()

    def _reset(self) -> None:
        self._kinds = []
        self._raws = []
        self._size = 0
        self._braces = 0
        self._brackets = 0

    def _token(self, kind: int, raw: bytes | None, length: int, out: list[Message]) -> None:
        if kind == LCURLY:
            self._braces += 1
        elif kind == RCURLY:
            self._braces -= 1
        elif kind == LSQUARE:
            self._brackets += 1
        elif kind == RSQUARE:
            self._brackets -= 1
        if self._size + length + 1 > self.max_size:
            return self._fail("JSON token size limit exceeded", out)
        if len(self._kinds) + 1 > self.max_tokens:
            return self._fail("JSON token count limit exceeded", out)
        if self._braces + self._brackets > self.max_nesting:
            return self._fail("JSON nesting depth limit exceeded", out)
        self._kinds.append(kind)
        self._raws.append(raw)
        self._size += length
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return None
        kinds, raws = self._kinds, self._raws
        self._reset()
        try:
            out.append(JsonValue(_parse(kinds, raws)))
        except _ParseFailure as exc:
            out.append(JsonError(f"JSON parse error, {exc}"))
        return None


# --- the parser: QEMU's grammar and messages, iterative (nesting may reach 1024) ---


def _parse(kinds: list[int], raws: list[bytes | None]) -> Any:
    n = len(kinds)
    i = 0
    # Stack of open containers: [container, pending key or None].
    stack: list[list[Any]] = []
    result: Any = None
    while True:
        # Expect a value at kinds[i].
        if i >= n:
            raise _ParseFailure("expecting value")
        k = kinds[i]
        i += 1
        if k == LCURLY:
            obj: dict[str, Any] = {}
            if i < n and kinds[i] == RCURLY:
                i += 1
                value: Any = obj
            else:
                key, i = _parse_key(kinds, raws, i, n)
                stack.append([obj, key])
                continue
        elif k == LSQUARE:
            arr: list[Any] = []
            if i < n and kinds[i] == RSQUARE:
                i += 1
                value = arr
            else:
                stack.append([arr, None])
                continue
        elif k == STRING:
            value = _decode_string(raws[i - 1])  # type: ignore[arg-type]
        elif k == NUMBER:
            value = _number(raws[i - 1])  # type: ignore[arg-type]
        elif k == KEYWORD:
            value = _keyword(raws[i - 1])  # type: ignore[arg-type]
        else:
            raise _ParseFailure("expecting value")
        # Attach the value to its container; close containers as their ends come.
        while True:
            if not stack:
                result = value
                if i != n:
                    raise _ParseFailure("unexpected input after value")
                return result
            top = stack[-1]
            container = top[0]
            if isinstance(container, dict):
                container[top[1]] = value
                if i < n and kinds[i] == COMMA:
                    key, i = _parse_key(kinds, raws, i + 1, n)
                    if key in container:
                        raise _ParseFailure("duplicate key")
                    top[1] = key
                    break
                if i < n and kinds[i] == RCURLY:
                    i += 1
                    stack.pop()
                    value = container
                    continue
                raise _ParseFailure("expected separator in dict")
            container.append(value)
            if i < n and kinds[i] == COMMA:
                i += 1
                break
            if i < n and kinds[i] == RSQUARE:
                i += 1
                stack.pop()
                value = container
                continue
            raise _ParseFailure("expected separator in list")


def _parse_key(kinds: list[int], raws: list[bytes | None], i: int, n: int) -> tuple[str, int]:
    if i >= n or kinds[i] in (RCURLY, RSQUARE, COLON, COMMA):
        raise _ParseFailure("expecting value")
    if kinds[i] != STRING:
        raise _ParseFailure("key is not a string in object")
    key = _decode_string(raws[i])  # type: ignore[arg-type]
    if i + 1 >= n or kinds[i + 1] != COLON:
        raise _ParseFailure("missing : in object pair")
    return key, i + 2


def _keyword(raw: bytes) -> Any:
    if raw == b"true":
        return True
    if raw == b"false":
        return False
    if raw == b"null":
        return None
    raise _ParseFailure(f"invalid keyword '{raw.decode('ascii')}'")


def _number(raw: bytes) -> int | float:
    """Integers that fit int64 or uint64 stay integers, others become floats (as in QEMU)."""
    if _IS_FLOAT.search(raw):
        return float(raw)
    value = int(raw)
    if INT64_MIN <= value <= UINT64_MAX:
        return value
    return float(raw)


_SIMPLE_ESCAPES = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _ParseFailure("invalid UTF-8 sequence in string") from None


def _decode_string(token: bytes) -> str:
    raw = token[1:-1]
    if b"\\" not in raw:
        return _utf8(raw)
    parts: list[str] = []
    i = 0
    while True:
        j = raw.find(b"\\", i)
        if j < 0:
            parts.append(_utf8(raw[i:]))
            return "".join(parts)
        parts.append(_utf8(raw[i:j]))
        c = raw[j + 1]
        if c != ord("u"):
            simple = _SIMPLE_ESCAPES.get(c)
            if simple is None:
                raise _ParseFailure("invalid escape sequence in string")
            parts.append(simple)
            i = j + 2
            continue
        cp, i = _hex_escape(raw, j + 2)
        if 0xD800 <= cp < 0xDC00:
            if raw[i : i + 2] != b"\\u":
                raise _ParseFailure("missing \\uXXXX escape for low surrogate")
            low, i = _hex_escape(raw, i + 2)
            if not 0xDC00 <= low < 0xE000:
                raise _ParseFailure("\\uXXXX escape is not a low surrogate")
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)
        elif 0xDC00 <= cp < 0xE000:
            raise _ParseFailure("stray \\uXXXX escape for low surrogate")
        elif cp == 0:
            raise _ParseFailure("\\u0000 is not supported")
        parts.append(chr(cp))


def _hex_escape(raw: bytes, at: int) -> tuple[int, int]:
    m = _HEX4.match(raw, at)
    if m is None:
        raise _ParseFailure("invalid hex escape sequence in string")
    return int(m.group(), 16), at + 4


def encode(obj: Any) -> bytes:
    """One output message: ASCII JSON (as QEMU: ``", "`` and ``": "`` separators), CRLF-terminated."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\r\n"
