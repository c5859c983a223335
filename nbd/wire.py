"""Every NBD wire format we speak, defined once with ``construct``.

Handshake and option traffic is parsed and built with these definitions directly. The per-request
headers of the transmission phase are on the hot path, where a ``construct`` call costs more than
the rest of the request's handling; for them this module also offers precompiled ``struct.Struct``
layouts (the ``*_FAST`` names) whose equivalence with the construct definitions is proven by
``tests/test_wire.py``. Extended headers are refused in negotiation, so their formats are not here.
"""

from __future__ import annotations

import struct

from construct import (
    Const,
    GreedyBytes,
    GreedyRange,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    PrefixedArray,
    Struct,
)

from nbd import constants as c

# --- handshake -----------------------------------------------------------------------------------

ServerGreeting = Struct(
    "magic" / Const(c.NBDMAGIC, Int64ub),
    "ihaveopt" / Const(c.IHAVEOPT, Int64ub),
    "handshake_flags" / Int16ub,
)

ClientFlags = Struct("client_flags" / Int32ub)

OptionHeader = Struct(
    "magic" / Const(c.IHAVEOPT, Int64ub),
    "option" / Int32ub,
    "length" / Int32ub,
)

OptionReplyHeader = Struct(
    "magic" / Const(c.OPT_REPLY_MAGIC, Int64ub),
    "option" / Int32ub,
    "reply" / Int32ub,
    "length" / Int32ub,
)

# The reply to NBD_OPT_EXPORT_NAME has no option-reply header (124 zero bytes follow unless
# NO_ZEROES was agreed; they are sent separately).
ExportNameReply = Struct("size" / Int64ub, "transmission_flags" / Int16ub)

String32 = PascalString(Int32ub, "utf8")
String16 = PascalString(Int16ub, "utf8")

# NBD_OPT_INFO / NBD_OPT_GO request data.
InfoRequest = Struct(
    "name" / String32,
    "requests" / PrefixedArray(Int16ub, Int16ub),
)

# NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT request data.
MetaContextRequest = Struct(
    "name" / String32,
    "queries" / PrefixedArray(Int32ub, String32),
)

# NBD_REP_SERVER payload: a name, then an optional human-readable description filling the rest.
RepServer = Struct(
    "name" / String32,
    "description" / GreedyBytes,
)

RepMetaContext = Struct(
    "context_id" / Int32ub,
    "name" / GreedyBytes,
)

InfoType = Struct("info" / Int16ub)
InfoExport = Struct("info" / Const(c.Info.EXPORT, Int16ub), "size" / Int64ub, "transmission_flags" / Int16ub)
InfoName = Struct("info" / Const(c.Info.NAME, Int16ub), "name" / GreedyBytes)
InfoDescription = Struct("info" / Const(c.Info.DESCRIPTION, Int16ub), "description" / GreedyBytes)
InfoBlockSize = Struct(
    "info" / Const(c.Info.BLOCK_SIZE, Int16ub),
    "minimum" / Int32ub,
    "preferred" / Int32ub,
    "maximum" / Int32ub,
)

# --- transmission --------------------------------------------------------------------------------

Request = Struct(
    "magic" / Const(c.REQUEST_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int32ub,
)

SimpleReply = Struct(
    "magic" / Const(c.SIMPLE_REPLY_MAGIC, Int32ub),
    "error" / Int32ub,
    "cookie" / Int64ub,
)

StructuredReplyHeader = Struct(
    "magic" / Const(c.STRUCTURED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "length" / Int32ub,
)

# Structured reply chunk payloads.
OffsetDataHeader = Struct("offset" / Int64ub)  # the data follows, never through construct
OffsetHole = Struct("offset" / Int64ub, "length" / Int32ub)
BlockStatusDescriptor = Struct("length" / Int32ub, "status_flags" / Int32ub)
BlockStatusPayload = Struct(
    "context_id" / Int32ub,
    "descriptors" / GreedyRange(BlockStatusDescriptor),
)
ErrorChunk = Struct(
    "error" / Int32ub,
    "message" / String16,
)
ErrorOffsetChunk = Struct(
    "error" / Int32ub,
    "message" / String16,
    "offset" / Int64ub,
)

# --- fast paths (hot: one per request / reply) ---------------------------------------------------

REQUEST_FAST = struct.Struct(">IHHQQI")
SIMPLE_REPLY_FAST = struct.Struct(">IIQ")
STRUCTURED_REPLY_FAST = struct.Struct(">IHHQI")
OFFSET_DATA_FAST = struct.Struct(">IHHQIQ")  # chunk header + the data chunk's offset, in one pack
OFFSET_HOLE_FAST = struct.Struct(">IHHQIQI")  # chunk header + hole payload
BLOCK_STATUS_DESCRIPTOR_FAST = struct.Struct(">II")
OPTION_HEADER_FAST = struct.Struct(">QII")
OPTION_REPLY_HEADER_FAST = struct.Struct(">QIII")

__all__ = [name for name in dir() if name[0].isupper()]
