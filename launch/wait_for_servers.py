"""Wait until every SGLang server answers GET /health with 200, or fail after a timeout.

The trainer script runs this before torchrun: the servers of a heterogeneous job start at the same
time as the trainers but take minutes to load their weights, and a trainer whose first request
fails would end the job.

    python -m launch.wait_for_servers http://node-1:30000,http://node-2:30000 --timeout 3600
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request


def healthy(url: str, timeout_s: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False  # not up yet, refusing connections, or answering 503 while it loads


def wait_for_servers(urls: list[str], timeout_s: float, poll_s: float = 5.0) -> list[str]:
    """Returns the URLs still not healthy when the time ran out (empty: all answered)."""
    deadline = time.monotonic() + timeout_s
    waiting = list(urls)
    while waiting:
        waiting = [u for u in waiting if not healthy(u)]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
    return waiting


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.wait_for_servers", description=__doc__.split("\n")[0])
    p.add_argument("urls", help="comma-separated server URLs")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds (default: %(default)s)")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between rounds (default: %(default)s)")
    args = p.parse_args(argv)
    urls = [u for u in args.urls.split(",") if u]
    if not urls:
        print("wait_for_servers: error: no server URLs given", file=sys.stderr)
        return 2
    missing = wait_for_servers(urls, args.timeout, args.poll)
    if missing:
        print(f"wait_for_servers: error: no healthy answer within {args.timeout:.0f}s from {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"wait_for_servers: {len(urls)} server(s) healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
