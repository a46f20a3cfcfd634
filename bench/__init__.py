"""PriorReg's benchmarks: every method and the peers users would otherwise pick, same pairs, same run.

`python -m bench run --suite accuracy --data-root PATH --out DIR`; not tests (timings live here only).
"""
