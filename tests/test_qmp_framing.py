"""The QMP input stream parser: splits, garbage resynchronisation, limits, QEMU's messages."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.qmp.framing import JsonError, JsonStreamParser, JsonValue, Message, encode

ALPHABET = st.characters(blacklist_categories=["Cs", "Cn"])  # QEMU refuses noncharacters
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=ALPHABET, max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(alphabet=ALPHABET, max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(alphabet=ALPHABET, max_size=6), json_values, max_size=4)


def feed_all(chunks: list[bytes], **limits: Any) -> list[Message]:
    parser = JsonStreamParser(**limits)
    out: list[Message] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def values(messages: list[Message]) -> list[Any]:
    return [m.value if isinstance(m, JsonValue) else m for m in messages]


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(st.lists(json_objects, min_size=1, max_size=5), st.lists(st.integers(0, 10_000), max_size=20), st.booleans())
def test_arbitrary_splits_parse_identically(objs: list[dict[str, Any]], cuts: list[int], spaced: bool) -> None:
    """qemu.qmp sends objects back to back with no separator; any TCP segmentation must not matter."""
    sep = " \r\n" if spaced else ""
    data = sep.join(json.dumps(o, ensure_ascii=bool(cuts and cuts[0] % 2)) for o in objs).encode()
    whole = feed_all([data])
    assert values(whole) == objs
    assert values(feed_all(split(data, cuts))) == objs
    assert values(feed_all([bytes([b]) for b in data])) == objs


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(
    st.lists(json_objects, min_size=1, max_size=3),
    st.binary(max_size=30),
    st.lists(st.integers(0, 1000), max_size=10),
)
def test_garbage_then_control_character_resynchronises(
    objs: list[dict[str, Any]], garbage: bytes, cuts: list[int]
) -> None:
    """After any garbage, a control character (the spec's recipe) puts the parser back in a known state."""
    tail = b"".join(json.dumps(o).encode() for o in objs)
    data = garbage + b"\x01" + tail
    whole = feed_all([data])
    assert feed_all(split(data, cuts)) == whole
    assert values(whole)[-len(objs) :] == objs


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b'{"execute": }', ["JSON parse error, expecting value"]),
        (b'@abc"def" 12 {"execute":"q","id":2}', ["JSON parse error, stray '@'", {"execute": "q", "id": 2}]),
        (
            b'{"execute": @ "q", "id":3}',
            [
                "JSON parse error, stray '@'",
                "JSON parse error, expecting value",  # recovery resumed at ','
                "id",
                "JSON parse error, expecting value",
                3,
                "JSON parse error, expecting value",
            ],
        ),
        (
            b'{"execute":"q","id":"a\x01b"}{"x":1}',
            ["JSON parse error, stray '\"a\x01'", "JSON parse error, expecting value", {"x": 1}],
        ),
        (b'{"a":1}}', [{"a": 1}, "JSON parse error, expecting value"]),
        (b'{"a":1}]', [{"a": 1}, "JSON parse error, expecting value"]),
        (b" 13 ", [13]),
        (b'{"a":1,}', ["JSON parse error, expecting value"]),
        (b'{"a":1 "b":2}', ["JSON parse error, expected separator in dict"]),
        (b"{1:2}", ["JSON parse error, key is not a string in object"]),
        (b'{"a" 2}', ["JSON parse error, missing : in object pair"]),
        (b"[1 2]", ["JSON parse error, expected separator in list"]),
        (b'{"a":1]', ["JSON parse error, expected separator in dict"]),
        (b'"abc\\q"', ["JSON parse error, invalid escape sequence in string"]),
        (b'"\xff" "x" {}', ["JSON parse error, stray '\"\ufffd'", {}]),
        (b'"\xc3\x28" ', ["JSON parse error, invalid UTF-8 sequence in string"]),
        (b"truenulnull{}", ["JSON parse error, invalid keyword 'truenulnull'", {}]),
        (b'{"id":01}', ["JSON parse error, stray '01'", "JSON parse error, expecting value"]),
        (b'{"id":2, "id":3}', ["JSON parse error, duplicate key"]),
        (b"{'a':'it\\'s', 'b': \"q'\"}", [{"a": "it's", "b": "q'"}]),
        (b'{"s":"\\ud83d\\ude00\\u00e9\\/"}', [{"s": "\U0001f600\u00e9/"}]),
        (b'"\\u0000\xc0\x80" ', ["\x00\x00"]),  # QEMU's modified UTF-8
        (b'"\\ud83d" ', ["JSON parse error, \\ud83d is not a valid Unicode character"]),
        (b'"\\ud800\\u0041" ', ["JSON parse error, \\ud800 is not a valid Unicode character"]),
        (b'"\\udc00" ', ["JSON parse error, \\udc00 is not a valid Unicode character"]),
        (b'"\\u12G4" ', ["JSON parse error, \\u12G4 is not a valid Unicode character"]),
        (b'"\\u00"', ['JSON parse error, \\u00" is not a valid Unicode character']),
        (b'"\\ufffe" ', ["JSON parse error, \\ufffe is not a valid Unicode character"]),
        (b'"\xef\xb7\x90" ', ["JSON parse error, invalid UTF-8 sequence in string"]),
        (b'"\xed\xa0\x80" ', ["JSON parse error, invalid UTF-8 sequence in string"]),
        (b"0e3 -0 1.5E+2 1x", [0, "JSON parse error, invalid keyword 'e'", 3, 0, 150.0, 1]),
        (b"- 1 {}", ["JSON parse error, stray '- '", {}]),
        (b"1\xff{}", [1, "JSON parse error, stray '\ufffd'", {}]),
        (b" \n\xff{}", ["JSON parse error, stray '\ufffd'", {}]),
        (b"[-0.0e5, 1E2, 18446744073709551615, 18446744073709551616, -9223372036854775809]", None),
        (b"x\x01{}", ["JSON parse error, invalid keyword 'x'", "JSON parse error, stray '\x01'", {}]),
    ],
)
def test_qemu_behaviour(stream: bytes, expected: list[Any] | None) -> None:
    got = [m.desc if isinstance(m, JsonError) else m.value for m in feed_all([stream])]
    if expected is None:
        assert got == [[-0.0, 100.0, 2**64 - 1, float(2**64), float(-(2**63) - 1)]]
        assert isinstance(got[0][2], int) and isinstance(got[0][3], float)
    else:
        assert got == expected


def test_nesting_limit_like_qemu() -> None:
    """qemu-storage-daemon answers 1100 '[' + 1100 ']' with exactly this sequence, then serves again."""
    out = feed_all([b"[" * 1100 + b"]" * 1100 + b'{"execute":"x"}'])
    descs = [m.desc if isinstance(m, JsonError) else m.value for m in out]
    assert descs[0] == "JSON nesting depth limit exceeded"
    assert isinstance(descs[1], list)  # the 75-deep remainder, a (non-object) value
    assert descs[2:-1] == ["JSON parse error, expecting value"] * 1025
    assert descs[-1] == {"execute": "x"}


def test_size_limit_drops_value_and_recovers() -> None:
    big = b'{"execute":"x","id":"' + b"a" * 5000 + b'"}'
    out = feed_all([big[i : i + 100] for i in range(0, len(big), 100)] + [b'{"execute":"y"}'], max_size=1000)
    assert next(m.desc for m in out if isinstance(m, JsonError)) == "JSON token size limit exceeded"
    assert out[-1] == JsonValue({"execute": "y"})
    out = feed_all([b'{"a":[' + b"1," * 600 + b"1]}"], max_size=1000)
    assert out[0] == JsonError("JSON token size limit exceeded")


def test_token_count_limit() -> None:
    out = feed_all([b"[" + b"1," * 50 + b"1]{}"], max_tokens=20)
    assert out[0] == JsonError("JSON token count limit exceeded")
    assert out[-1] == JsonValue({})


def test_memory_is_released_after_each_value() -> None:
    parser = JsonStreamParser()
    parser.feed(b'{"execute":"x","id":"' + b"a" * 100_000 + b'"}')
    assert parser.pending == 0
    parser.feed(b'{"execute":"x","id":"abc')
    assert 0 < parser.pending < 100


def test_big_string_is_linear_in_chunks() -> None:
    """A 16 MiB string fed in 64 KiB pieces is scanned once, not once per piece."""
    big = b'{"id":"' + b"a" * (16 << 20) + b'"}'
    parser = JsonStreamParser()
    out: list[Message] = []
    for i in range(0, len(big), 65536):
        out.extend(parser.feed(big[i : i + 65536]))
    assert len(out) == 1 and isinstance(out[0], JsonValue) and len(out[0].value["id"]) == 16 << 20


def test_stray_quote_is_bounded() -> None:
    out = feed_all([b'"' + b"a" * 10_000 + b"\x01{}"])
    assert isinstance(out[0], JsonError) and len(out[0].desc) < 400
    assert out[-1] == JsonValue({})


def test_encode_is_ascii_crlf() -> None:
    assert encode({"return": {}, "id": "\u00e9"}) == b'{"return": {}, "id": "\\u00e9"}\r\n'
    with pytest.raises(ValueError):
        encode({"x": float("nan")})


TRICKY = [
    b'{"a":1,"a":2}',
    b'{"n":0e5}',
    b'{"n":-0E+1}',
    b'{"n":NaN}',
    b'{"n":-Infinity}',
    b'{"s":"\\ud800"}',
    b'{"s":"\\udc00\\ud800"}',
    b'{"s":"\\ud83d\\ude00"}',
    b'{"s":"\\ufffe"}',
    b'{"s":"\\uFDD5"}',
    b'{"s":"\\u0000"}',
    b'{"s":"\xef\xbf\xbe"}',
    b'{"s":"\xc3\xa9"}',
    b'{"s":"\xc0\x80"}',
    b'{"n":18446744073709551616,"m":-9223372036854775809,"k":18446744073709551615}',
    b'{"a":' * 1100 + b"1" + b"}" * 1100,
    b'{"a":' * 900 + b"1" + b"}" * 900,
    b"{'a':1}",
    b'{"a":"\x01"}',
    b'{"a":[1,2,{"b":null}],"c":true,"d":-0.5e-3}',
    b'{"a":1}}',
    b'{"a":"' + b"x" * 5000 + b'"}',
]


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(
    st.lists(st.sampled_from(TRICKY) | json_objects.map(lambda o: json.dumps(o).encode()), min_size=1, max_size=6),
    st.lists(st.integers(0, 20_000), max_size=8),
)
def test_fast_path_agrees_with_the_automaton(parts: list[bytes], cuts: list[int]) -> None:
    """The stdlib fast path is only an optimisation: every stream parses exactly as without it."""
    data = b" ".join(parts)
    limits = {"max_size": 3000, "max_nesting": 1024}
    fast = feed_all(split(data, cuts), **limits)
    slow = JsonStreamParser(fast_path=False, **limits)
    expected: list[Message] = []
    for chunk in split(data, cuts):
        expected.extend(slow.feed(chunk))
    assert fast == expected
