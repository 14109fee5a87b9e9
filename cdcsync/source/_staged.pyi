from collections.abc import Sequence

def latest_versions(
    chunks: Sequence[bytes], key_fields: Sequence[int], /
) -> list[bytes] | None: ...
def stage_rows(
    rows: Sequence[tuple[bytes, int, int, int, int, int]], width: int, /
) -> tuple[bytes, int] | None: ...
