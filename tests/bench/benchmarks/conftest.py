"""pytest-benchmark grouping for the suite: providers of one work item and shape side by side."""

from collections import defaultdict

IGNORED_PARAMS = {"provider", "work"}  # provider: compared inside a table; work: already the group


def pytest_benchmark_group_stats(config, benchmarks, group_by):
    """``--benchmark-group-by=group,param``: "param" leaves out the provider, so each table compares providers.

    Any other grouping falls through to pytest-benchmark's own (return None)."""
    keys = group_by.split(",")
    if "param" not in keys or not set(keys) <= {"group", "param"}:
        return None
    groups = defaultdict(list)
    for bench in benchmarks:
        params = sorted((k, v) for k, v in (bench["params"] or {}).items() if k not in IGNORED_PARAMS)
        parts = [bench["group"] if k == "group" else " ".join(f"{n}={v}" for n, v in params) for k in keys]
        groups[" ".join(p for p in parts if p) or None].append(bench)
    for rows in groups.values():
        rows.sort(key=lambda b: b["name"])
    return sorted(groups.items(), key=lambda pair: pair[0] or "")
