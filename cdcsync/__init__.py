"""cdcsync: keep a target PostgreSQL equal to a source through a logical-replication slot."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cdcsync")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
