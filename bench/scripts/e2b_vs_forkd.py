#!/usr/bin/env python3
"""Time from "create a sandbox" to the first command's answer through E2B's
own SDK (against forkd's E2B layer) next to the same through forkd's Python
client, pair by pair in one run against one daemon.

    FORKD_URL=http://127.0.0.1:8889 FORKD_TOKEN=... \
        python3 bench/scripts/e2b_vs_forkd.py --template py --reps 20

Needs the `e2b` and `forkd` packages (scripts/test-clients.sh installs both
into $FORKD_CACHE_DIR/venv). Each sandbox is killed after its sample.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import e2b
import forkd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--template", required=True, help="snapshot tag to start from")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    url = os.environ.get("FORKD_URL", "http://127.0.0.1:8889").rstrip("/")
    token = os.environ["FORKD_TOKEN"]
    os.environ.update(E2B_API_URL=f"{url}/e2b", E2B_SANDBOX_URL=url, E2B_API_KEY=token)

    # The SDK's commands.run runs `/bin/bash -l -c CMD`: forkd is timed both
    # with the bare command and with the same login shell.
    ours, ours_shell, theirs = [], [], []
    with forkd.Client(url, token=token) as c:
        for i in range(a.reps):
            # Alternate which goes first, so drift hits both alike.
            for which in (("forkd", "shell", "e2b") if i % 2 == 0 else ("e2b", "shell", "forkd")):
                t0 = time.perf_counter()
                if which in ("forkd", "shell"):
                    sb = c.sandbox(a.template)
                    argv = ["true"] if which == "forkd" else ["/bin/bash", "-l", "-c", "true"]
                    assert sb.exec(argv).exit_code == 0
                    (ours if which == "forkd" else ours_shell).append(time.perf_counter() - t0)
                    sb.kill()
                else:
                    s = e2b.Sandbox.create(template=a.template, timeout=120)
                    assert s.commands.run("true").exit_code == 0
                    theirs.append(time.perf_counter() - t0)
                    s.kill()

    def row(name: str, xs: list) -> str:
        xs = sorted(xs)
        p90 = xs[min(len(xs) - 1, int(len(xs) * 0.9))]
        return f"{name:<28} {statistics.median(xs) * 1000:>9.1f} {p90 * 1000:>9.1f} {len(xs):>5}"

    print(f"{'create → first command':<28} {'median ms':>9} {'p90 ms':>9} {'n':>5}")
    print(row("forkd client, `true`", ours))
    print(row("forkd client, bash -l -c true", ours_shell))
    print(row("E2B SDK (e2b 2.63.0)", theirs))
    for name, base in (("`true`", ours), ("bash -l -c true", ours_shell)):
        ratio = statistics.median(theirs) / statistics.median(base)
        print(f"ratio E2B / forkd ({name}), medians: {ratio:.2f}x")


if __name__ == "__main__":
    main()
