#!/usr/bin/env python3
"""The whole-program figure, paired: runs the `kv_*` bench binaries (one per
global allocator) side by side and writes target/criterion/memwatch-kv-paired.json
for report.py.

Two processes, bare jemalloc and one other, each keep a steady-state key-value
map and take turns running the next 5,000 operations of the same churn (about
5 ms), alternating which goes first; the ratio of each turn's two wall times is
one sample. A pair of processes gives the median of its 40 samples. Identical
binaries in two processes differ by several percent (where the address space
layout puts the heap and the tables), so every figure is the geometric mean
over 24 fresh pairs of processes, with its 90% interval and the lowest and
highest pair beside it. Bare jemalloc against a second process of itself is
the control: it shows what this method cannot resolve.

Usage: python3 benches/kv_paired.py [--pairs P] [--rounds R]
"""

import json
import os
import subprocess
import sys

from paired_processes import line, median, summary, turns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "criterion", "memwatch-kv-paired.json")
BASE = "kv_jemalloc"
OTHERS = ["kv_jemalloc", "kv_system", "kv_memwatch_jemalloc", "kv_memwatch_system", "kv_cap_jemalloc"]
OPS = 5000
PAIRS = 24
ROUNDS = 40


def executables():
    """{bench target name: path}, building the benches if needed."""
    out = subprocess.run(
        ["cargo", "bench", "-p", "memwatch", "--no-run", "--message-format=json"],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout
    exes = {}
    for line in out.splitlines():
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m.get("executable"):
            exes[m["target"]["name"]] = m["executable"]
    return exes


class Churn:
    """One bench binary serving paired rounds (see benches/kv/mod.rs)."""

    def __init__(self, path):
        env = dict(os.environ, MEMWATCH_KV_PAIRED="1")
        self.path = path
        self.p = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def wait_ready(self):
        """Waits for the warm-up, which both processes of a pair run at once."""
        if self.p.stdout.readline().strip() != "ready":
            raise RuntimeError("%s did not start paired rounds" % self.path)

    def run(self, ops):
        self.p.stdin.write("%d\n" % ops)
        self.p.stdin.flush()
        return int(self.p.stdout.readline())

    def close(self):
        self.p.stdin.close()
        if self.p.wait() != 0:
            raise RuntimeError("a kv bench binary failed")


def pair_median(base, other, rounds):
    a, b = Churn(base), Churn(other)
    a.wait_ready()
    b.wait_ready()
    times = turns(lambda: a.run(OPS), lambda: b.run(OPS), rounds)
    a.close()
    b.close()
    return median([o / t for t, o in times]), median([t for t, _ in times])


def main():
    args = sys.argv[1:]
    pairs = int(args[args.index("--pairs") + 1]) if "--pairs" in args else PAIRS
    rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else ROUNDS
    exes = executables()
    results = {}
    for name in OTHERS:
        medians, base_ns = [], []
        for _ in range(pairs):
            m, ns = pair_median(exes[BASE], exes[name], rounds)
            medians.append(m)
            base_ns.append(ns)
        label = name[3:].replace("_", "-")
        results[label] = dict(summary(medians), pairs=pairs, rounds=rounds, ops=OPS,
                              base_ms=median(base_ns) / 1e6)
        print(line(label, results[label]))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    json.dump(results, open(OUT, "w"), indent=1)


if __name__ == "__main__":
    main()
