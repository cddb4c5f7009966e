"""`python -m bench` (`make bench`): every `bench.bench_*` module's `main()` in turn, sync or
async. A module that fails to import or run prints `bench <module> FAILED <reason>` and the
others still run; the exit status is 1 if any did."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import pkgutil
import sys
import time
import traceback

import bench


def modules() -> list[str]:
    return sorted(
        f"bench.{m.name}"
        for m in pkgutil.iter_modules(bench.__path__)
        if m.name.startswith("bench_")
    )


def run(name: str) -> bool:
    started = time.perf_counter()
    print(f"# {name}", file=sys.stderr, flush=True)
    try:
        main = importlib.import_module(name).main
        result = main()
        if inspect.isawaitable(result):
            asyncio.run(result)  # type: ignore[arg-type]
        return True
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        print(f"bench {name.removeprefix('bench.')} FAILED {reason}", flush=True)
        return False
    finally:
        print(f"# {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def main() -> int:
    results = [run(name) for name in modules()]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
