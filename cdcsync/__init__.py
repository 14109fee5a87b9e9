"""cdcsync: keep a target PostgreSQL equal to a source through a logical-replication slot."""

__version__ = "0.1.0"
