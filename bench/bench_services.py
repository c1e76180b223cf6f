"""Benchmark: what the service table holds and costs at its bounds (iii/services.py).

Fills the table as 10 hostile workers would, each at its 1024-service bound
with 100-byte descriptions, then reports the memory tracemalloc measured
beside the bytes the table counted (the byte bounds are meant to be at or
above real memory), the time of one ``engine::services::list`` grouping over
about 10,000 functions, and the time to remove the workers' services.

Run: ``python bench/bench_services.py``.
"""

from __future__ import annotations

import time
import tracemalloc

from iii.services import MAX_SERVICES_PER_WORKER, ServiceRegistration, ServiceTable

WORKERS = 10


def main() -> None:
    tracemalloc.start()
    table = ServiceTable()
    for worker in range(WORKERS):
        for index in range(MAX_SERVICES_PER_WORKER):
            service_id = f"s{worker}_{index}"
            table.add(
                ServiceRegistration(
                    id=service_id,
                    name=f"s{worker}_{index}",
                    owner=f"w{worker}",
                    description=f"{index:0100d}",
                )
            )
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    count = table.total_registrations
    print(
        f"{count} services: {traced / 1e6:.1f} MB traced, {table.total_bytes / 1e6:.1f} MB counted"
    )
    functions = [
        f"s{w}_{i}::fn{j}"
        for w in range(WORKERS)
        for i in range(0, MAX_SERVICES_PER_WORKER, 10)
        for j in range(10)
    ]
    rounds = 10
    start = time.perf_counter()
    for _ in range(rounds):
        listing = table.listing(functions)
    elapsed = (time.perf_counter() - start) / rounds
    print(f"listing {len(listing)} services / {len(functions)} functions: {elapsed * 1000:.1f} ms")
    start = time.perf_counter()
    for worker in range(WORKERS):
        table.remove_worker(f"w{worker}")
    print(f"removing {WORKERS} workers' services: {(time.perf_counter() - start) * 1000:.1f} ms")
    assert not table.services and table.total_bytes == 0


if __name__ == "__main__":
    main()
