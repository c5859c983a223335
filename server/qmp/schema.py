"""Declarative QMP argument types, validated the way QEMU's QAPI input visitor does.

Why mimic QEMU exactly: clients (and our differential tests) compare error classes and messages
with qemu-storage-daemon's. The rules below were checked against qemu-storage-daemon 7.2:

- members are visited in schema order, so "missing" is reported before "unexpected";
- type errors name the full path (``addr.data.port``, ``actions[0]``): "Invalid parameter type for
  'P', expected: T" with T one of string/integer/number/boolean/object/array (or an alternate's name);
- "Parameter 'P' is missing" / "Parameter 'P' is unexpected" name the full path too;
- enum, integer-range and alternate errors name only the member itself (QEMU's visitor core does not
  know the path; inside a list the name is ``null``): "Parameter 'aio' does not accept value 'x'",
  "Parameter 'max-connections' expects uint32_t", "Invalid parameter type for 'file', expected: BlockdevRef".

A schema is written with plain Python values: ``{"device": "str", "*speed": "int", "*ids": ["str"]}``
(a ``*`` prefix marks an optional member, as in QAPI), or with the classes here for enums, unions and
alternates. ``resolve`` turns such a spec into a ``QType``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from server.errors import QmpError

__all__ = [
    "BUILTINS",
    "Alternate",
    "Any_",
    "Enum",
    "Int",
    "List",
    "Member",
    "ObjectType",
    "Path",
    "QType",
    "Spec",
    "Struct",
    "Union",
    "resolve",
    "resolve_arguments",
    "validate_arguments",
]

Spec: TypeAlias = "QType | str | list[Any] | Mapping[str, Any]"

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1


def _generic(desc: str) -> QmpError:
    return QmpError(desc, "GenericError")


@dataclass(frozen=True)
class Path:
    """Where a value sits in the arguments: the full dotted path for the input visitor's messages and
    the bare member name (``None`` for list elements) for the visitor core's."""

    full: str
    name: str | None

    def member(self, key: str) -> Path:
        return Path(f"{self.full}.{key}" if self.full else key, key)

    def element(self, index: int) -> Path:
        return Path(f"{self.full}[{index}]", None)

    @property
    def bare(self) -> str:
        return self.name if self.name is not None else "null"


ROOT = Path("", None)


class QType:
    """A QAPI type: ``check`` returns the validated value (a fresh copy) or raises ``QmpError``."""

    #: The JSON kind this type accepts, used to pick an alternate's branch ("string", "number",
    #: "boolean", "object", "array", "null"; ``None`` means any).
    kind: str | None = None
    #: The name shown in "expected: ..." messages.
    expected: str = "value"

    def check(self, value: Any, path: Path) -> Any:
        raise NotImplementedError

    def type_error(self, path: Path) -> QmpError:
        return _generic(f"Invalid parameter type for '{path.full}', expected: {self.expected}")

    def describe(self) -> str:
        """A short human description for ``--help`` style listings."""
        return self.expected


class _Str(QType):
    kind = "string"
    expected = "string"

    def check(self, value: Any, path: Path) -> Any:
        if not isinstance(value, str):
            raise self.type_error(path)
        return value


class _Bool(QType):
    kind = "boolean"
    expected = "boolean"

    def check(self, value: Any, path: Path) -> Any:
        if not isinstance(value, bool):
            raise self.type_error(path)
        return value


class _Number(QType):
    kind = "number"
    expected = "number"

    def check(self, value: Any, path: Path) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.type_error(path)
        return float(value)


class _Null(QType):
    kind = "null"
    expected = "null"

    def check(self, value: Any, path: Path) -> Any:
        if value is not None:
            raise self.type_error(path)
        return None


class Any_(QType):
    """QAPI's ``any``: every JSON value."""

    expected = "any"

    def check(self, value: Any, path: Path) -> Any:
        return value


class Int(QType):
    """A QAPI integer type. Signed types are visited as int64 first ("expected: integer"), unsigned as
    uint64 (negative int64 values wrap, as QEMU does for backward compatibility), then range-checked
    ("expects int32_t")."""

    kind = "number"
    expected = "integer"

    def __init__(self, qapi_name: str, c_name: str, lo: int, hi: int, *, unsigned: bool) -> None:
        self.qapi_name = qapi_name
        self.c_name = c_name
        self.lo = lo
        self.hi = hi
        self.unsigned = unsigned

    def check(self, value: Any, path: Path) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.type_error(path) if not self.unsigned else self._uint64_error(path)
        if self.unsigned:
            if 0 <= value <= UINT64_MAX:
                pass
            elif INT64_MIN <= value < 0:
                value &= UINT64_MAX
            else:
                raise self._uint64_error(path)
        elif not INT64_MIN <= value <= INT64_MAX:
            raise self.type_error(path)
        if not self.lo <= value <= self.hi:
            raise _generic(f"Parameter '{path.bare}' expects {self.c_name}")
        return value

    @staticmethod
    def _uint64_error(path: Path) -> QmpError:
        return _generic(f"Parameter '{path.full}' expects uint64")

    def describe(self) -> str:
        return self.qapi_name


class Enum(QType):
    """A QAPI enum: a string from a fixed set."""

    kind = "string"
    expected = "string"

    def __init__(self, name: str, values: Sequence[str]) -> None:
        self.name = name
        self.values = tuple(values)

    def check(self, value: Any, path: Path) -> Any:
        if not isinstance(value, str):
            raise self.type_error(path)
        if value not in self.values:
            raise _generic(f"Parameter '{path.bare}' does not accept value '{value}'")
        return value

    def describe(self) -> str:
        return "|".join(self.values)


class List(QType):
    kind = "array"
    expected = "array"

    def __init__(self, element: Spec) -> None:
        self.element = resolve(element)

    def check(self, value: Any, path: Path) -> Any:
        if not isinstance(value, list):
            raise self.type_error(path)
        return [self.element.check(item, path.element(i)) for i, item in enumerate(value)]

    def describe(self) -> str:
        return f"[{self.element.describe()}]"


@dataclass(frozen=True)
class Member:
    name: str
    type: QType
    optional: bool


def _members(spec: Mapping[str, Any]) -> tuple[Member, ...]:
    out = []
    for key, sub in spec.items():
        optional = key.startswith("*")
        out.append(Member(key[1:] if optional else key, resolve(sub), optional))
    return tuple(out)


class ObjectType(QType):
    """A JSON object type (struct or flat union); the arguments of a command are one."""

    kind = "object"
    expected = "object"

    def check(self, value: Any, path: Path) -> Any:
        if not isinstance(value, dict):
            raise self.type_error(path)
        out: dict[str, Any] = {}
        self.check_members(value, path, out)
        for key in value:
            if key not in out:
                raise _generic(f"Parameter '{path.member(key).full}' is unexpected")
        return out

    def check_members(self, value: dict[str, Any], path: Path, out: dict[str, Any]) -> None:
        raise NotImplementedError

    @staticmethod
    def visit(members: Sequence[Member], value: dict[str, Any], path: Path, out: dict[str, Any]) -> None:
        for m in members:
            sub = path.member(m.name)
            if m.name not in value:
                if not m.optional:
                    raise _generic(f"Parameter '{sub.full}' is missing")
                continue
            out[m.name] = m.type.check(value[m.name], sub)

    def member_names(self) -> list[str]:
        """Names a client may send (all branches of a union), for help output."""
        raise NotImplementedError


class Struct(ObjectType):
    def __init__(self, name: str | None, members: Mapping[str, Any], *, base: Struct | None = None) -> None:
        self.name = name
        self.members: tuple[Member, ...] = (base.members if base else ()) + _members(members)

    def check_members(self, value: dict[str, Any], path: Path, out: dict[str, Any]) -> None:
        self.visit(self.members, value, path, out)

    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def describe(self) -> str:
        return self.name or "object"


class Union(ObjectType):
    """A QAPI flat union: common members (one of them the enum ``discriminator``), then the members
    of the branch the discriminator's value selects (a value without a branch adds none)."""

    def __init__(
        self,
        name: str,
        base: Mapping[str, Any],
        discriminator: str,
        variants: Mapping[str, Mapping[str, Any] | Struct],
    ) -> None:
        self.name = name
        self.base = _members(base)
        self.discriminator = discriminator
        if not any(m.name == discriminator and not m.optional for m in self.base):
            raise ValueError(f"union {name}: discriminator {discriminator!r} must be a required base member")
        self.variants = {key: (v.members if isinstance(v, Struct) else _members(v)) for key, v in variants.items()}

    def set_variant(self, value: str, members: Mapping[str, Any] | Struct) -> None:
        """Add or replace a branch after construction: how recursive types (``BlockdevOptions`` whose
        ``file`` is a ``BlockdevRef`` holding ``BlockdevOptions``) are tied."""
        self.variants[value] = members.members if isinstance(members, Struct) else _members(members)

    def check_members(self, value: dict[str, Any], path: Path, out: dict[str, Any]) -> None:
        self.visit(self.base, value, path, out)
        self.visit(self.variants.get(out[self.discriminator], ()), value, path, out)

    def member_names(self) -> list[str]:
        names = [m.name for m in self.base]
        for members in self.variants.values():
            names.extend(m.name for m in members if m.name not in names)
        return names

    def describe(self) -> str:
        return self.name


class Alternate(QType):
    """A QAPI alternate (``StrOrNull``, ``BlockdevRef``): the JSON kind of the value picks the branch."""

    def __init__(self, name: str, branches: Sequence[Spec]) -> None:
        self.name = name
        self.expected = name
        self.branches = [resolve(b) for b in branches]
        kinds = [b.kind for b in self.branches]
        if None in kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"alternate {name}: branches need distinct JSON kinds")

    def check(self, value: Any, path: Path) -> Any:
        kind = _json_kind(value)
        for branch in self.branches:
            if branch.kind == kind:
                return branch.check(value, path)
        raise _generic(f"Invalid parameter type for '{path.bare}', expected: {self.name}")

    def describe(self) -> str:
        return self.name


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _int(qapi: str, c: str, bits: int, unsigned: bool) -> Int:
    if unsigned:
        return Int(qapi, c, 0, (1 << bits) - 1, unsigned=True)
    return Int(qapi, c, -(1 << (bits - 1)), (1 << (bits - 1)) - 1, unsigned=False)


BUILTINS: dict[str, QType] = {
    "str": _Str(),
    "bool": _Bool(),
    "number": _Number(),
    "null": _Null(),
    "any": Any_(),
    "int": _int("int", "int64_t", 64, False),
    "int8": _int("int8", "int8_t", 8, False),
    "int16": _int("int16", "int16_t", 16, False),
    "int32": _int("int32", "int32_t", 32, False),
    "int64": _int("int64", "int64_t", 64, False),
    "uint8": _int("uint8", "uint8_t", 8, True),
    "uint16": _int("uint16", "uint16_t", 16, True),
    "uint32": _int("uint32", "uint32_t", 32, True),
    "uint64": _int("uint64", "uint64_t", 64, True),
    "size": _int("size", "uint64_t", 64, True),
}


def resolve(spec: Any) -> QType:
    """Turn a spec (a ``QType``, a builtin name, ``[element]``, or ``{member: spec}``) into a ``QType``."""
    if isinstance(spec, QType):
        return spec
    if isinstance(spec, str):
        try:
            return BUILTINS[spec]
        except KeyError:
            raise ValueError(f"unknown QAPI builtin type {spec!r}") from None
    if isinstance(spec, list) and len(spec) == 1:
        return List(spec[0])
    if isinstance(spec, Mapping):
        return Struct(None, spec)
    raise ValueError(f"not a QAPI type spec: {spec!r}")


def resolve_arguments(spec: Any) -> ObjectType:
    """The argument type of a command: ``None`` (no arguments), a member mapping, or an object type
    (a union for 'boxed' commands such as ``blockdev-add``)."""
    if spec is None:
        return Struct(None, {})
    t = resolve(spec)
    if not isinstance(t, ObjectType):
        raise ValueError("command arguments must be an object type")
    return t


def validate_arguments(args_type: ObjectType, arguments: dict[str, Any]) -> dict[str, Any]:
    """Validate a command's ``arguments`` object; returns the validated copy."""
    result: dict[str, Any] = args_type.check(arguments, ROOT)
    return result
