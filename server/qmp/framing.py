"""QMP framing: an incremental parser for a stream of JSON values, and the encoder for output lines.

Sans-I/O (bytes in, messages out), modelled on QEMU's JSON lexer + streamer + parser so that clients
see the same behaviour as with qemu-storage-daemon 7.2 (checked by running the same byte streams
against it):

- No newline is required between values (qemu.qmp sends none); a value ends when its closing bracket
  balances the ones it opened, or at once for a top-level scalar.
- QEMU's extension: ``'single-quoted'`` strings, and the ``\\'`` escape in both kinds of string.
- A lexical error (a stray byte, a control character inside a string, a malformed number) is reported
  as ``JSON parse error, stray '...'`` and drops the value being collected; the lexer then skips input
  until a structural character (``{ } [ ] : ,``), a line ending, another control character or
  ``\\xfe``/``\\xff``, and lexes on from there (so a control character is reported once more) — the
  resynchronisation the QMP spec describes ("Forcing the JSON parser into known-good state"); a tab
  does not end it.
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
LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA, STRING, INTEGER, FLOAT, KEYWORD = range(10)

# Lexer states (QEMU's json-lexer.c automaton; a token in progress is in one of the non-START states).
(
    START,
    RECOVERY,
    DQ,
    DQ_ESC,
    SQ,
    SQ_ESC,
    ZERO,
    DIGITS,
    SIGN,
    MANTISSA,
    MANTISSA_DIGITS,
    EXP_E,
    EXP_SIGN,
    EXP_DIGITS,
    KEYWORD_RUN,
) = range(15)

_STRUCTURAL = {
    ord("{"): LCURLY,
    ord("}"): RCURLY,
    ord("["): LSQUARE,
    ord("]"): RSQUARE,
    ord(":"): COLON,
    ord(","): COMMA,
}
_START_STATES = {
    ord('"'): DQ,
    ord("'"): SQ,
    ord("0"): ZERO,
    ord("-"): SIGN,
    **{c: DIGITS for c in b"123456789"},
    **{c: KEYWORD_RUN for c in b"abcdefghijklmnopqrstuvwxyz"},
}
_WS_RUN = re.compile(rb"[ \t\r\n]*")
_DIGIT_RUN = re.compile(rb"[0-9]*")
_LOWER_RUN = re.compile(rb"[a-z]*")
# String bodies: runs of bytes 0x20..0xFD other than the quote and the backslash; a backslash may be
# followed by any such byte (the parser, not the lexer, judges escapes — as in QEMU).
_PLAIN = {
    DQ: re.compile(rb'[^"\\\x00-\x1f\xfe\xff]*'),
    SQ: re.compile(rb"[^'\\\x00-\x1f\xfe\xff]*"),
}
_QUOTE = {DQ: ord('"'), SQ: ord("'")}
# Recovery ends before a structural character, a line ending or another control character (not a tab),
# or an impossible UTF-8 byte; lexing resumes there, in the start state.
_RECOVERY_END = re.compile(rb"[\x00-\x08\x0a-\x1f\xfe\xff{}\[\]:,]")
_IS_FLOAT = re.compile(rb"[.eE]")
_BACKSLASH = ord("\\")
_DOT = ord(".")
_EXP = frozenset(b"eE")
_PLUS_MINUS = frozenset(b"+-")
_DIGIT = frozenset(b"0123456789")


class _ParseFailure(Exception):
    pass


# --- fast path: well-formed objects through the stdlib's C scanner -----------------------------
#
# Most input is plain JSON objects, which the stdlib's C scanner parses much faster than the automaton below.
# An object takes this path only when QEMU would certainly read it the same way: ASCII, at most
# FAST_PATH_MAX bytes (so under every limit, nesting included), no NaN/Infinity, no duplicate keys,
# no "0e5"-style numbers (QEMU lexes those as 0 and a keyword), no escapes of surrogates or
# noncharacters. Anything else — or any doubt — goes through the automaton.

FAST_PATH_MAX = 1 << 20
_LCURLY_BYTE = ord("{")
_SUSPECT_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|[fF][dD][d-eD-E]|[fF][fF][fF][eEfF])")
_ZERO_EXPONENT = re.compile(r"-?0[eE]")


class _NotFast(Exception):
    pass


def _fast_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _NotFast  # duplicate key: the automaton reports it
    return result


def _fast_int(text: str) -> int | float:
    value = int(text)
    return value if INT64_MIN <= value <= UINT64_MAX else float(text)


def _fast_float(text: str) -> float:
    if _ZERO_EXPONENT.match(text):
        raise _NotFast
    return float(text)


def _fast_constant(text: str) -> Any:
    raise _NotFast  # NaN, Infinity


_FAST_DECODER = json.JSONDecoder(
    object_pairs_hook=_fast_pairs, parse_int=_fast_int, parse_float=_fast_float, parse_constant=_fast_constant
)


def _fast_object(text: str, pos: int, limit: int, max_nesting: int) -> tuple[Any, int] | None:
    """``(value, end)`` for a plain JSON object at ``text[pos]``, or None to take the slow path."""
    try:
        value, end = _FAST_DECODER.raw_decode(text, pos)
    except (ValueError, _NotFast, RecursionError):
        return None
    if end - pos > limit:
        return None
    span = text[pos:end]
    if end - pos > 2 * max_nesting and span.count("{") + span.count("[") > max_nesting:
        return None
    if not span.isascii() or ("\\u" in span and _SUSPECT_ESCAPE.search(span)):
        return None
    return value, end


class JsonStreamParser:
    """Feed bytes as they arrive; get back the complete messages (values or errors) in order."""

    def __init__(
        self,
        *,
        max_size: int = MAX_TOKEN_SIZE,
        max_tokens: int = MAX_TOKEN_COUNT,
        max_nesting: int = MAX_NESTING,
        fast_path: bool = True,
    ) -> None:
        self.max_size = max_size
        self.max_tokens = max_tokens
        self.max_nesting = max_nesting
        # A span this short is under the size and token limits whatever its content.
        self._fast_limit = min(FAST_PATH_MAX, max_size - 1, max_tokens) if fast_path else 0
        self._buf = bytearray()
        self._pos = 0  # next byte to lex
        self._state = START
        self._tok_start = 0  # where the token in progress starts in _buf
        # The value being collected (QEMU's streamer): token kinds, their raw bytes, and counters.
        self._kinds: list[int] = []
        self._raws: list[bytes | None] = []
        self._size = 0
        self._braces = 0
        self._brackets = 0

    @property
    def pending(self) -> int:
        """Bytes held for an unfinished value (for tests and diagnostics)."""
        return self._size + len(self._buf) - self._keep_from(self._pos)

    def _keep_from(self, pos: int) -> int:
        return pos if self._state in (START, RECOVERY) else self._tok_start

    def feed(self, data: bytes) -> list[Message]:
        out: list[Message] = []
        buf = self._buf
        buf += data
        n = len(buf)
        pos = self._pos
        text: str | None = None  # buf as latin-1 (1 char per byte), made once per feed for the fast path
        while pos < n:
            state = self._state
            if state == RECOVERY:
                m = _RECOVERY_END.search(buf, pos)
                if m is None:
                    pos = n
                    break
                pos = m.start()  # lexed again from the start state (a control character: one more error)
                self._state = START
                continue
            if state == START:
                pos = _WS_RUN.match(buf, pos).end()  # type: ignore[union-attr]
                if pos >= n:
                    break
                c = buf[pos]
                if c == _LCURLY_BYTE and not self._kinds and self._fast_limit:
                    if text is None:
                        text = buf.decode("latin-1")
                    fast = _fast_object(text, pos, self._fast_limit, self.max_nesting)
                    if fast is not None:
                        out.append(JsonValue(fast[0]))
                        pos = fast[1]
                        continue
                kind = _STRUCTURAL.get(c)
                if kind is not None:
                    pos += 1
                    self._token(kind, None, 1, out)
                    continue
                self._tok_start = pos
                pos += 1
                next_state = _START_STATES.get(c)
                if next_state is None:
                    self._lex_error(buf, pos, out)
                    continue
                self._state = next_state
            pos = self._continue_token(buf, pos, out)
        if self._state not in (START, RECOVERY) and self._size + (n - self._tok_start) + 1 > self.max_size:
            # A token too big even before it ends: drop it with the value it is part of, resync after it.
            self._fail("JSON token size limit exceeded", out)
            self._state = RECOVERY
        keep = self._keep_from(pos)
        if keep:
            del buf[:keep]
            pos -= keep
            self._tok_start -= keep
        self._pos = pos
        return out

    def _continue_token(self, buf: bytearray, pos: int, out: list[Message]) -> int:
        """Run the automaton over the token in progress from ``pos``; returns where lexing goes on
        (``len(buf)`` when the token needs more input — the state remembers where it is)."""
        n = len(buf)
        state = self._state
        while pos < n:
            if state in (DQ, SQ):
                pos = _PLAIN[state].match(buf, pos).end()  # type: ignore[union-attr]
                if pos >= n:
                    break
                c = buf[pos]
                pos += 1
                if c == _QUOTE[state]:
                    return self._emit(STRING, buf, pos, out)
                if c != _BACKSLASH:
                    return self._lex_error(buf, pos, out)
                state += 1  # DQ_ESC / SQ_ESC: the byte after the backslash is in the next chunk
                continue
            c = buf[pos]
            if state in (DQ_ESC, SQ_ESC):
                pos += 1
                if not 0x20 <= c <= 0xFD:
                    return self._lex_error(buf, pos, out)
                state -= 1
            elif state in (DIGITS, MANTISSA_DIGITS, EXP_DIGITS, KEYWORD_RUN):
                pos = (_LOWER_RUN if state == KEYWORD_RUN else _DIGIT_RUN).match(buf, pos).end()  # type: ignore[union-attr]
                if pos >= n:
                    break
                c = buf[pos]
                if state == DIGITS and c == _DOT:
                    state = MANTISSA
                elif state in (DIGITS, MANTISSA_DIGITS) and c in _EXP:
                    state = EXP_E
                else:
                    kind = KEYWORD if state == KEYWORD_RUN else INTEGER if state == DIGITS else FLOAT
                    return self._emit(kind, buf, pos, out)
                pos += 1
            elif state == ZERO:
                if c == _DOT:
                    state = MANTISSA
                    pos += 1
                elif c in _DIGIT:
                    return self._lex_error(buf, pos + 1, out)
                else:
                    return self._emit(INTEGER, buf, pos, out)
            else:  # SIGN, MANTISSA, EXP_E, EXP_SIGN: one specific byte must follow
                pos += 1
                if state == SIGN and c in _DIGIT:
                    state = ZERO if c == ord("0") else DIGITS
                elif state in (MANTISSA, EXP_SIGN) and c in _DIGIT:
                    state = MANTISSA_DIGITS if state == MANTISSA else EXP_DIGITS
                elif state == EXP_E and (c in _DIGIT or c in _PLUS_MINUS):
                    state = EXP_DIGITS if c in _DIGIT else EXP_SIGN
                else:
                    return self._lex_error(buf, pos, out)
        self._state = state
        return n

    def _emit(self, kind: int, buf: bytearray, end: int, out: list[Message]) -> int:
        self._state = START
        raw = bytes(buf[self._tok_start : end])
        self._token(kind, raw, len(raw), out)
        return end

    def _lex_error(self, buf: bytearray, end: int, out: list[Message]) -> int:
        """The token so far, up to and including the offending byte, is reported; then recovery."""
        text = bytes(buf[self._tok_start : min(end, self._tok_start + MAX_STRAY_QUOTE + 1)])
        quoted = _render_c_string(text[:MAX_STRAY_QUOTE])
        if end - self._tok_start > MAX_STRAY_QUOTE:
            quoted += "..."
        self._fail(f"JSON parse error, stray '{quoted}'", out)
        self._state = RECOVERY
        return end

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


class _BadKey:
    """Stack marker: the container being parsed sits where an object key belongs (an error once parsed)."""


_BAD_KEY = _BadKey()


def _parse(kinds: list[int], raws: list[bytes | None]) -> Any:
    """QEMU's recursive-descent grammar, run iteratively (values may nest 1024 deep)."""
    n = len(kinds)
    i = 0
    # Open containers, innermost last: [container, its pending key (dicts)] or [_BAD_KEY, None].
    stack: list[list[Any]] = []
    while True:
        # A value starts at kinds[i].
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
                stack.append([obj, None])
                i = _start_pair(kinds, raws, i, n, stack)
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
        elif k in (INTEGER, FLOAT):
            value = _number(raws[i - 1])  # type: ignore[arg-type]
        elif k == KEYWORD:
            value = _keyword(raws[i - 1])  # type: ignore[arg-type]
        else:
            raise _ParseFailure("expecting value")
        # Attach the value to its container; close containers as their ends come.
        while True:
            if not stack:
                if i != n:
                    raise _ParseFailure("unexpected input after value")
                return value
            top = stack[-1]
            container = top[0]
            if container is _BAD_KEY:
                raise _ParseFailure("key is not a string in object")
            if isinstance(container, dict):
                if top[1] in container:
                    raise _ParseFailure("duplicate key")
                container[top[1]] = value
                if i < n and kinds[i] == COMMA:
                    i = _start_pair(kinds, raws, i + 1, n, stack)
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


def _start_pair(kinds: list[int], raws: list[bytes | None], i: int, n: int, stack: list[list[Any]]) -> int:
    """Parse ``key :`` of the innermost object; returns where its value starts. Like QEMU, the key is
    parsed as any value first, so its own errors come before "key is not a string"."""
    k = kinds[i] if i < n else None
    if k == STRING:
        stack[-1][1] = _decode_string(raws[i])  # type: ignore[arg-type]
        if i + 1 >= n or kinds[i + 1] != COLON:
            raise _ParseFailure("missing : in object pair")
        return i + 2
    if k in (LCURLY, LSQUARE):
        stack.append([_BAD_KEY, None])  # parse the container, then fail
        return i
    if k == KEYWORD:
        _keyword(raws[i])  # type: ignore[arg-type]
    if k in (KEYWORD, INTEGER, FLOAT):
        raise _ParseFailure("key is not a string in object")
    raise _ParseFailure("expecting value")


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
# Noncharacters (U+FDD0..U+FDEF, U+xxFFFE, U+xxFFFF): QEMU refuses them, encoded or escaped.
_NONCHARACTER = re.compile(
    "[\ufdd0-\ufdef" + "".join(f"{chr(p << 16 | 0xFFFE)}{chr(p << 16 | 0xFFFF)}" for p in range(17)) + "]"
)
# The same, as they appear in valid UTF-8 (faster to find in the bytes than in the decoded text).
_NONCHARACTER_UTF8 = re.compile(rb"\xef\xb7[\x90-\xaf]|\xef\xbf[\xbe\xbf]|[\xf0-\xf4][\x8f\x9f\xaf\xbf]\xbf[\xbe\xbf]")
_MODIFIED_UTF8_NUL = b"\xc0\x80"


def _valid_codepoint(cp: int) -> bool:
    return 0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF and (cp & 0xFFFE) != 0xFFFE and not 0xFDD0 <= cp <= 0xFDEF


def _utf8(raw: bytes) -> str:
    """QEMU's "modified UTF-8": strict UTF-8, plus ``C0 80`` for NUL, minus noncharacters."""
    try:
        if _MODIFIED_UTF8_NUL in raw:
            text = "\x00".join(part.decode("utf-8") for part in raw.split(_MODIFIED_UTF8_NUL))
        else:
            text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _ParseFailure("invalid UTF-8 sequence in string") from None
    if not text.isascii() and _NONCHARACTER_UTF8.search(raw):
        raise _ParseFailure("invalid UTF-8 sequence in string")
    return text


def _hex4(raw: bytes, at: int) -> int:
    m = _HEX4.match(raw, at)
    return int(m.group(), 16) if m else -1


def _decode_string(token: bytes) -> str:
    """A string token (quotes included) to its value, with QEMU's escapes and error messages."""
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
        cp = _hex4(raw, j + 2)
        end = j + 6
        if 0xD800 <= cp <= 0xDBFF and raw[end : end + 2] == b"\\u":
            trailing = _hex4(raw, end + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (trailing & 0x3FF)
                end += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            # QEMU quotes the escape's six bytes (cut at the end of the token).
            escape = _render_c_string(token[j + 1 : j + 7])
            raise _ParseFailure(f"{escape} is not a valid Unicode character")
        parts.append(chr(cp))
        i = end


_MIN_CODEPOINT = {2: 0x80, 3: 0x800, 4: 0x10000, 5: 0x200000, 6: 0x4000000}


def _render_c_string(data: bytes) -> str:
    """Bytes as QEMU puts them in a message: a C string (ends at NUL), decoded as modified UTF-8 with
    one U+FFFD per invalid sequence (a sequence ends at the first byte that does not continue it)."""
    data = data.split(b"\0", 1)[0]
    try:
        text = data.decode("utf-8")
        if not _NONCHARACTER.search(text):
            return text
    except UnicodeDecodeError:
        pass
    out: list[str] = []
    i, n = 0, len(data)
    while i < n:
        byte = data[i]
        i += 1
        if byte < 0x80:
            out.append(chr(byte))
            continue
        if byte >= 0xFE or not byte & 0x40:
            out.append("\ufffd")
            continue
        length = 8 - (byte ^ 0xFF).bit_length()  # leading one bits
        cp = byte & (0x7F >> length)
        for _ in range(length - 1):
            if i >= n or data[i] & 0xC0 != 0x80:
                cp = -1
                break
            cp = cp << 6 | data[i] & 0x3F
            i += 1
        if cp >= 0 and _valid_codepoint(cp) and (cp >= _MIN_CODEPOINT[length] or (cp == 0 and length == 2)):
            out.append(chr(cp))
        else:
            out.append("\ufffd")
    return "".join(out)


def encode(obj: Any) -> bytes:
    """One output message: ASCII JSON (as QEMU: ``", "`` and ``": "`` separators), CRLF-terminated."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\r\n"
