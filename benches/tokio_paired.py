#!/usr/bin/env python3
"""The tokio server under HTTP load, paired: `examples/tokio-server` built
twice, with memwatch over jemalloc as its global allocator (as shipped) and
with bare jemalloc (`--features bare-jemalloc`), and driven by `wrk`.

Both servers run at once. They take turns under the same load (`wrk`, one
thread, 16 connections, GET of a 1 KiB value, `--turn` seconds), alternating
which goes first; the ratio of the two turns' requests per second (bare over
memwatch, so that above 1 means memwatch is slower, as in the other tables)
is one sample. A pair of processes gives the median of its samples; the
figure is the geometric mean over fresh pairs, with a 90% interval. Bare
jemalloc against a second process of itself is the control row. Writes
target/criterion/memwatch-tokio-paired.json for report.py.

Needs `wrk` (Debian's package: `apt-get install wrk`).

Usage: python3 benches/tokio_paired.py [--pairs P] [--turns T] [--turn SECONDS]
"""

import json
import os
import re
import shutil
import subprocess
import sys

from paired_processes import line, median, summary, turns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "criterion", "memwatch-tokio-paired.json")
BIN = os.path.join(ROOT, "target", "tokio-paired")
PAIRS = 6
TURNS = 12
TURN_S = 1


def build():
    """{"memwatch": path, "jemalloc": path}: both variants, copied aside."""
    os.makedirs(BIN, exist_ok=True)
    out = {}
    for name, features in [("memwatch", []), ("jemalloc", ["--features", "bare-jemalloc"])]:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "tokio-server"] + features,
                       cwd=ROOT, check=True)
        dst = os.path.join(BIN, "tokio-server-" + name)
        shutil.copy(os.path.join(ROOT, "target", "release", "tokio-server"), dst)
        out[name] = dst
    return out


class Server:
    def __init__(self, path):
        env = dict(os.environ, TOKIO_SERVER_ADDR="127.0.0.1:0", RUST_LOG="warn")
        for var in list(env):
            if var.startswith("ELASTICKV_MEMORY_"):
                del env[var]
        self.p = subprocess.Popen([path], stdout=subprocess.PIPE, text=True, env=env)
        line = self.p.stdout.readline().strip()
        if not line.startswith("listening on "):
            raise RuntimeError("%s: %r" % (path, line))
        self.url = line[len("listening on "):]
        body = b"v" * 1024
        subprocess.run(["curl", "-sf", "-X", "PUT", "--data-binary", "@-", self.url + "/kv/k"],
                       input=body, check=True)

    def load(self, seconds):
        """Requests per second over one turn."""
        out = subprocess.run(["wrk", "-t1", "-c16", "-d%ds" % seconds, self.url + "/kv/k"],
                             check=True, capture_output=True, text=True).stdout
        m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
        if not m or " Non-2xx" in out:
            raise RuntimeError("wrk: %s" % out)
        return float(m.group(1))

    def close(self):
        self.p.terminate()
        if self.p.wait() != 0:
            raise RuntimeError("a tokio-server did not stop cleanly")


def pair_median(base, other, n, seconds):
    a, b = Server(base), Server(other)
    a.load(1)  # warm both up: connections, tcache, the runtime's threads
    b.load(1)
    rps = turns(lambda: a.load(seconds), lambda: b.load(seconds), n)
    a.close()
    b.close()
    return median([r_base / r_other for r_base, r_other in rps]), median([r for r, _ in rps])


def main():
    args = sys.argv[1:]
    opt = lambda flag, default: type(default)(args[args.index(flag) + 1]) if flag in args else default
    pairs, turns_per_pair, seconds = opt("--pairs", PAIRS), opt("--turns", TURNS), opt("--turn", TURN_S)
    if shutil.which("wrk") is None:
        sys.exit("tokio_paired.py needs wrk (apt-get install wrk)")
    exes = build()
    results = {}
    for name, label in [("jemalloc", "jemalloc"), ("memwatch", "memwatch-jemalloc")]:
        medians, base_rps = [], []
        for _ in range(pairs):
            m, rps = pair_median(exes["jemalloc"], exes[name], turns_per_pair, seconds)
            medians.append(m)
            base_rps.append(rps)
        results[label] = dict(summary(medians), pairs=pairs, turns=turns_per_pair, turn_s=seconds,
                              base_rps=median(base_rps))
        print(line(label, results[label]) + ", bare jemalloc %.0f req/s" % median(base_rps))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    json.dump(results, open(OUT, "w"), indent=1)


if __name__ == "__main__":
    main()
