from collections.abc import Sequence

def latest_versions(
    chunks: Sequence[bytes], key_fields: Sequence[int], /
) -> list[bytes] | None: ...
