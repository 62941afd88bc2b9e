#!/usr/bin/env python3
"""A server in a sandbox, reached two ways in one run against one VM:
through the daemon's port proxy (the agent channel) and straight over the
sandbox's NIC (`network: "nat"`, from inside its network namespace). Prints
request latency (a small file, one connection per request, as the proxy
opens one per request) and throughput (a large file) for each, pair by pair.

    sudo python3 bench/scripts/ports_bench.py --url http://127.0.0.1:8889 \\
        --token "$(cat /var/lib/forkd/token)" --tag py --reps 50 --size-mib 32

Needs root (for `ip netns exec`) and a snapshot of an image with python3.
Only the standard library: the same file is the client inside the namespace.
The sandbox is killed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request

PORT = 8000


def fetch(url: str, headers: dict[str, str]) -> tuple[float, int]:
    """One GET on a fresh connection: (seconds, bytes)."""
    u = urllib.parse.urlsplit(url)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=120)
    path = u.path + (f"?{u.query}" if u.query else "")
    conn.request("GET", path, headers=headers)
    r = conn.getresponse()
    n = 0
    while True:
        chunk = r.read(1 << 20)
        if not chunk:
            break
        n += len(chunk)
    conn.close()
    if r.status != 200:
        raise SystemExit(f"GET {url}: {r.status}")
    return time.perf_counter() - t0, n


def measure(base: str, headers: dict[str, str], reps: int, big_reps: int) -> dict:
    small = [fetch(f"{base}/small.txt", headers)[0] for _ in range(reps)]
    rates = []
    for _ in range(big_reps):
        secs, n = fetch(f"{base}/blob", headers)
        rates.append(n / secs / 1e6)
    small.sort()
    return {
        "p50_ms": statistics.median(small) * 1e3,
        "p90_ms": small[int(0.9 * (len(small) - 1))] * 1e3,
        "mb_s": statistics.median(rates),
    }


class Daemon:
    def __init__(self, url: str, token: str):
        self.url, self.token = url.rstrip("/"), token

    def call(self, method: str, path: str, body: object | None = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read() or b"null")

    def sh(self, sid: str, script: str) -> str:
        r = self.call("POST", f"/v1/sandboxes/{sid}/exec", {"args": ["sh", "-c", script], "timeout_secs": 300})
        if r["exit_code"] != 0:
            raise SystemExit(f"{script}: {r}")
        return r["stdout"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8889")
    ap.add_argument("--token", default="")
    ap.add_argument("--tag", help="snapshot to fork (an image with python3)")
    ap.add_argument("--reps", type=int, default=50, help="small requests per path")
    ap.add_argument("--size-mib", type=int, default=32, help="size of the large file")
    ap.add_argument("--big-reps", type=int, default=3, help="large downloads per path")
    ap.add_argument("--client", help=argparse.SUPPRESS)  # inside the namespace: measure this base URL
    a = ap.parse_args()
    if a.client:
        print(json.dumps(measure(a.client, {}, a.reps, a.big_reps)))
        return
    if not a.tag:
        raise SystemExit("--tag is required")
    d = Daemon(a.url, a.token)
    sid = d.call("POST", "/v1/sandboxes", {"snapshot_tag": a.tag, "network": "nat"})[0]["id"]
    try:
        d.sh(sid, f"mkdir -p /srv && echo small > /srv/small.txt && head -c {a.size_mib << 20} /dev/urandom > /srv/blob")
        d.call("POST", f"/v1/sandboxes/{sid}/processes",
               {"args": ["python3", "-m", "http.server", str(PORT), "--directory", "/srv"], "tag": "bench"})
        proxy = f"{d.url}/v1/sandboxes/{sid}/ports/{PORT}"
        auth = {"Authorization": f"Bearer {d.token}"}
        for _ in range(300):
            try:
                fetch(f"{proxy}/small.txt", auth)
                break
            except (SystemExit, OSError):
                time.sleep(0.2)
        ns = f"forkd-{sid[3:]}"
        # The guest's address on its NIC (it depends on the network slot).
        addr = d.sh(sid, "ip -o -4 addr show eth0").split("inet ")[1].split("/")[0]
        direct = f"http://{addr}:{PORT}"
        # Alternate the two paths, so drift hits both alike.
        rounds = {"channel": [], "nat": []}
        for i in range(2):
            for which in (("channel", "nat") if i % 2 == 0 else ("nat", "channel")):
                if which == "channel":
                    rounds["channel"].append(measure(proxy, auth, a.reps // 2, a.big_reps))
                else:
                    out = subprocess.run(
                        ["ip", "netns", "exec", ns, sys.executable, __file__, "--client", direct,
                         "--reps", str(a.reps // 2), "--big-reps", str(a.big_reps)],
                        check=True, capture_output=True, text=True)
                    rounds["nat"].append(json.loads(out.stdout))
        print(f"{'path':<40} {'p50 ms':>8} {'p90 ms':>8} {'MB/s':>8}")
        names = {"channel": "proxy over the agent channel", "nat": "direct over the NIC (network nat)"}
        for k in ("channel", "nat"):
            r = rounds[k]
            p50 = statistics.median(x["p50_ms"] for x in r)
            p90 = statistics.median(x["p90_ms"] for x in r)
            mb = statistics.median(x["mb_s"] for x in r)
            print(f"{names[k]:<40} {p50:>8.2f} {p90:>8.2f} {mb:>8.1f}")
    finally:
        d.call("DELETE", f"/v1/sandboxes/{sid}")


if __name__ == "__main__":
    main()
