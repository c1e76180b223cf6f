"""Benchmark: what the depth bound (iii.json_limits) costs on top of ``orjson.loads``.

For frames of the sizes the engine routes (a small call, a REST request
with a 200-item body, a 0.8 MB call with 60,000 containers, a 1.3 MB flat
array), it times ``orjson.loads`` alone, :func:`iii.json_limits.loads` (the
bound as the engine applies it: a ``count`` of brackets, then orjson's own
writer when the count is over the limit), and an exact walk in Python over
the decoded value (the alternative the cheap path avoids).

Run: ``python bench/bench_json_limits.py [--repeat 5]``; each figure is the
best of ``--repeat`` timings, in microseconds per frame.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iii import json_limits  # noqa: E402

ID = "8dd4b577-2860-45cc-acff-17fb868ec5ac"


def frames() -> list[tuple[str, bytes]]:
    def call(data: Any) -> bytes:
        message = {"type": "invokefunction", "function_id": "f", "invocation_id": ID}
        return orjson.dumps({**message, "data": data})

    items = [{"id": i, "name": f"i{i}", "tags": ["a", "b"], "meta": {"k": i}} for i in range(200)]
    rows = [{"id": i, "v": [i, i + 1, {"x": "y"}]} for i in range(20_000)]
    return [
        ("small call", call({"n": 1, "s": "hello"})),
        ("REST, 200 items", call({"body": {"items": items}, "headers": {"a": "b"}})),
        ("0.8 MB, 60k containers", call({"rows": rows})),
        ("1.3 MB flat array", call({"nums": list(range(200_000))})),
    ]


def _walk(value: Any) -> bool:
    return json_limits._walk_exceeds(value, json_limits.MAX_DEPTH)


def best(fn: Any, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(
        f"{'frame':24} {'bytes':>9} {'orjson.loads':>13} {'bounded loads':>14} "
        f"{'overhead':>9} {'walk':>10}"
    )
    for name, raw in frames():
        number = 2000 if len(raw) < 100_000 else 10
        value = orjson.loads(raw)
        plain = best(lambda raw=raw: orjson.loads(raw), number, args.repeat)
        bounded = best(lambda raw=raw: json_limits.loads(raw), number, args.repeat)
        walk = best(lambda value=value: _walk(value), number, args.repeat)
        print(
            f"{name:24} {len(raw):9d} {plain:11.1f}us {bounded:12.1f}us "
            f"{(bounded - plain) / plain:8.0%} {walk:8.1f}us"
        )


if __name__ == "__main__":
    main()
