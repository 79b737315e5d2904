"""Wait until every SGLang server answers GET /health with 200, or fail after a timeout.

The trainer script runs this before torchrun: the servers of a heterogeneous job start at the same
time as the trainers but take minutes to load their weights, and a trainer whose first request
fails would end the job.

    python -m launch.wait_for_servers http://node-1:30000,http://node-2:30000 --timeout 3600
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

from launch.supervise import GIVEN_UP


def health(url: str, timeout_s: float = 5.0) -> str:
    """"ok", "waiting" (not up yet, refusing connections, or answering 503 while it loads) or, for a
    server its supervisor gave up (launch.supervise), the supervisor's reason."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as response:
            return "ok" if response.status == 200 else "waiting"
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read() or b"{}").get("error", "")
        except (ValueError, AttributeError, OSError):
            reason = ""
        return reason if isinstance(reason, str) and reason.startswith(GIVEN_UP) else "waiting"
    except (urllib.error.URLError, OSError, ValueError):
        return "waiting"


def healthy(url: str, timeout_s: float = 5.0) -> bool:
    return health(url, timeout_s) == "ok"


def wait_for_servers(urls: list[str], timeout_s: float, poll_s: float = 5.0) -> list[str]:
    """Returns the URLs still not healthy when the time ran out (empty: all answered), each with the
    reason of its supervisor when it gave the server up; a given-up server ends the wait at once (it
    will not answer: waiting out the timeout would only delay the failure)."""
    deadline = time.monotonic() + timeout_s
    waiting = list(urls)
    while waiting:
        states = {u: health(u) for u in waiting}
        waiting = [u for u, state in states.items() if state != "ok"]
        given_up = [f"{u} ({state})" for u, state in states.items() if state.startswith(GIVEN_UP)]
        if given_up:
            return given_up
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
        if any(GIVEN_UP in m for m in missing):
            print(f"wait_for_servers: error: {', '.join(m for m in missing if GIVEN_UP in m)}", file=sys.stderr)
        else:
            print(f"wait_for_servers: error: no healthy answer within {args.timeout:.0f}s from {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"wait_for_servers: {len(urls)} server(s) healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
