"""The F5 plugin's logic natively, under CPython, for BENCHMARKS.md's
"Languages": batches of 10 distinct VMs as the lifecycle bench hands the
component (vm_on.json with category F5Pool=web: one NIC, one address),
VM.ON and then VM.OFF.

Two hosts for the logic:

- by default the tests' in-memory BIG-IP and kv: the logic alone (what it
  leaves out against the component's figures is the host's kv and HTTP);
- with `--bigip URL`, a real BIG-IP (the lifecycle bench passes its
  simulator) over HTTP, one keep-alive connection, the `Authorization`
  header added as the host injects it: the same requests the component
  makes. The kv stays in memory (the component's is the host's redb).

    python3 plugins/f5-bigip/bench.py
    python3 plugins/f5-bigip/bench.py --bigip http://127.0.0.1:8443 --authorization "Basic YWRtaW46YWRtaW4="
"""

import argparse
import http.client
import os
import statistics
import sys
import time
import urllib.parse
from types import SimpleNamespace as NS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))

import f5sync  # noqa: E402
from test_f5sync import FakeHost, config, event, vm  # noqa: E402

SIZE = 10
ROUNDS = 200


class HttpHost(FakeHost):
    """The tests' host with its BIG-IP replaced by a real one over HTTP."""

    def __init__(self, base, authorization):
        super().__init__(pools=())
        parts = urllib.parse.urlsplit(base)
        if parts.scheme != "http":
            raise SystemExit(f"--bigip must be an http:// URL, not {base!r}")
        self.base = base.rstrip("/")
        self.authorization = authorization
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port)

    def send(self, method, url, headers, body, timeout_ms):
        if not url.startswith(self.base + "/"):
            raise f5sync.HttpFailure("denied", f"{url} is not on {self.base}")
        headers = dict(headers)
        if self.authorization:
            headers["Authorization"] = self.authorization
        self.connection.timeout = timeout_ms / 1000
        self.connection.request(method, url[len(self.base):], body=body, headers=headers)
        response = self.connection.getresponse()
        return NS(status=response.status, headers=response.getheaders(), body=response.read())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bigip", help="a BIG-IP (or simulator) to send the requests to, over http://")
    parser.add_argument("--authorization", default="", help="the Authorization header the host would inject")
    args = parser.parse_args()
    if args.bigip:
        cfg = config(bigip=args.bigip, port=8080, category="F5Pool")
        host, against = HttpHost(args.bigip, args.authorization), f"BIG-IP at {args.bigip} over HTTP, kv in memory"
    else:
        cfg = config(port=8080, category="F5Pool")
        host, against = FakeHost(), "in-memory BIG-IP and kv"
    on_times, off_times = [], []
    for round_ in range(ROUNDS):
        vms = [vm(uuid=f"{round_:08d}-0000-4000-8000-{i:012d}",
                  ips=(f"10.{round_ % 200}.{i // 250}.{i % 250 + 1}",)) for i in range(SIZE)]
        on = [event("VM.ON", v) for v in vms]
        off = [event("VM.OFF", vm(uuid=v.uuid, ips=v.nics[0].ips, power="OFF")) for v in vms]
        for batch, times in ((on, on_times), (off, off_times)):
            started = time.perf_counter()
            out = f5sync.handle(cfg, host, batch)
            times.append((time.perf_counter() - started) / SIZE)
            if out != [f5sync.DONE] * SIZE:
                raise SystemExit(f"not every event was done, the first: {next(o for o in out if o != f5sync.DONE)}")
        host.requests.clear()
    warm = ROUNDS // 10
    print(f"f5sync.handle natively (CPython {sys.version.split()[0]}, {against}), batches of {SIZE}, "
          f"{ROUNDS - warm} rounds after {warm} warm-up, median per event: "
          f"VM.ON {statistics.median(on_times[warm:]) * 1e6:.1f} µs, "
          f"VM.OFF {statistics.median(off_times[warm:]) * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
