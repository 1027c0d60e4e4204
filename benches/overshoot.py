"""How far past the threshold the heap is when the latch trips.

Runs allocator-tests' `overshoot` binary (release build) for 1 to 128
threads allocating in 64 KiB and 1 KiB steps until the trip, against a
256 MiB threshold, and writes target/criterion/memwatch-overshoot.json for
benches/report.py. The heap at the trip is an exact tally kept beside
memwatch, taken as each thread stops (so one step per thread after the trip
is in it); the bound is the error budget (16 MiB at this threshold) plus
64 KiB and one step per thread.
"""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "overshoot")
OUT = os.path.join(ROOT, "target", "criterion", "memwatch-overshoot.json")
THRESHOLD = 256 << 20


def main():
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTICKV_MEMORY_")}
    env["ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB"] = "256"
    rows = []
    for threads in [1, 2, 8, 32, 128]:
        for step in [64 << 10, 1 << 10]:
            out = subprocess.run([BIN, str(threads), str(step)], env=env, capture_output=True,
                                 text=True, timeout=120)
            heap = next(int(l.split(": ")[1]) for l in out.stdout.splitlines()
                        if l.startswith("heap at trip: "))
            rows.append({"threads": threads, "step": step, "code": out.returncode,
                         "over_kib": (heap - THRESHOLD) // 1024,
                         "bound_kib": (16 << 10) + threads * (64 + step // 1024)})
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    json.dump(rows, open(OUT, "w"), indent=1)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
