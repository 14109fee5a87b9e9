"""``cdcsync verify``: prove source and target hold the same rows, or name the keys that differ.

    spec.py     which columns and keys are compared, and how each side spells them (catalog I/O)
    sql.py      the queries: range summaries, key lists, boundary samples (pure builders)
    sides.py    one connection and one thread per side; the target checkpoint
    compare.py  range hashing and bisection down to keys, then re-checks past in-flight changes
    report.py   what was found, as data, as a terminal table and as JSON
    job.py      the scheduled verification of a rotating sample of ranges
"""
