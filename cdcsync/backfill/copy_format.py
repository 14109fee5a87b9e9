"""Whether a plain COPY may travel in binary rather than text.

Binary COPY spares both servers the text output and input functions (timestamps and numerics
above all: about 20% of a psql pipe's time on a typical table). But a binary value is only
meaningful to the very same type: the receive function trusts the sender's layout, arrays
carry their element type's OID, and some types carry OIDs or have no binary form at all
(``regclass``, user-defined composites, ``aclitem``). So binary is used only when every copied
column has the same built-in type on both sides, from the list below, whose binary forms hold
nothing database-specific; any other table goes as text, which is always safe.
"""

from __future__ import annotations

import psycopg
from psycopg.rows import TupleRow

from cdcsync.model import Relation, TargetTable

Conn = psycopg.Connection[TupleRow]

# pg_type OIDs, fixed for built-in types across PostgreSQL versions.
_SCALARS = {
    16: "bool", 17: "bytea", 18: "char", 19: "name", 20: "int8", 21: "int2", 23: "int4",
    25: "text", 114: "json", 650: "cidr", 700: "float4", 701: "float8", 774: "macaddr8",
    829: "macaddr", 869: "inet", 1042: "bpchar", 1043: "varchar", 1082: "date", 1083: "time",
    1114: "timestamp", 1184: "timestamptz", 1186: "interval", 1266: "timetz", 1560: "bit",
    1562: "varbit", 1700: "numeric", 2950: "uuid", 3220: "pg_lsn", 3802: "jsonb",
}
_ARRAYS = {
    1000: "bool[]", 1001: "bytea[]", 1005: "int2[]", 1007: "int4[]", 1009: "text[]",
    1014: "bpchar[]", 1015: "varchar[]", 1016: "int8[]", 1021: "float4[]", 1022: "float8[]",
    1115: "timestamp[]", 1182: "date[]", 1185: "timestamptz[]", 1231: "numeric[]",
    2951: "uuid[]", 199: "json[]", 3807: "jsonb[]",
}
BINARY_SAFE = frozenset(_SCALARS) | frozenset(_ARRAYS)

_TARGET_TYPES_SQL = """
SELECT attname, atttypid::int FROM pg_attribute
WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped
"""


def binary(target: Conn, relation: Relation, table: TargetTable) -> bool:
    """True when every column ``table`` copies has one binary-safe type on both servers."""
    target_types = {str(r[0]): int(r[1]) for r in
                    target.execute(_TARGET_TYPES_SQL, (table.oid,)).fetchall()}
    for position, name in zip(table.positions, table.columns, strict=True):
        source_type = relation.columns[position].type_oid
        if source_type not in BINARY_SAFE or target_types.get(name) != source_type:
            return False
    return True
