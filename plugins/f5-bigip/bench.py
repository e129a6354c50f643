"""The F5 plugin's logic natively, under CPython, for BENCHMARKS.md's
"Languages": batches of 10 distinct VMs as the lifecycle bench hands the
component (vm_on.json with category F5Pool=web: one NIC, one address),
VM.ON and then VM.OFF, against the tests' in-memory BIG-IP and kv. What
it leaves out against the component's figures is the host's kv (redb) and
HTTP to the BIG-IP simulator; the fake's own JSON coding is in.

    python3 plugins/f5-bigip/bench.py
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))

import f5sync  # noqa: E402
from test_f5sync import FakeHost, config, event, vm  # noqa: E402

SIZE = 10
ROUNDS = 200


def main():
    cfg = config(port=8080, category="F5Pool")
    host = FakeHost()
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
            assert out == [f5sync.DONE] * SIZE, out
        host.requests.clear()
    warm = ROUNDS // 10
    print(f"f5sync.handle natively (CPython {sys.version.split()[0]}), batches of {SIZE}, "
          f"{ROUNDS - warm} rounds after {warm} warm-up, median per event: "
          f"VM.ON {statistics.median(on_times[warm:]) * 1e6:.1f} µs, "
          f"VM.OFF {statistics.median(off_times[warm:]) * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
