#!/usr/bin/env python3
"""Turns criterion's results (target/criterion) and the extra figures that
the other benches leave beside them (memwatch-paired.json, memwatch-extra.json,
memwatch-instructions.json, memwatch-kv-paired.json) into the tables and chart
of docs/benchmarks.md. Every ratio compares with bare jemalloc on the same
workload in the same run.

Usage: python3 benches/report.py [--print]   (--print: table to stdout only)
"""

import glob
import json
import math
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRIT = os.path.join(ROOT, "target", "criterion")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
PNG = os.path.join(ROOT, "docs", "benchmarks.png")
MOVES = [16, 32, 48]
ORDER = ["system", "jemalloc", "memwatch-jemalloc", "memwatch-system", "cap-jemalloc", "atomic-jemalloc"]
KV_ORDER = ["jemalloc", "system", "memwatch-jemalloc", "memwatch-system", "cap-jemalloc"]


def load():
    """{group: {allocator: median_ns}}"""
    out = {}
    for bench in glob.glob(os.path.join(CRIT, "**", "new", "benchmark.json"), recursive=True):
        meta = json.load(open(bench))
        est = json.load(open(os.path.join(os.path.dirname(bench), "estimates.json")))
        group = meta["group_id"]
        name = meta.get("value_str") or meta.get("function_id")
        out.setdefault(group, {})[name] = est["median"]["point_estimate"]
    return out


def group_key(g):
    parts = re.split(r"[/]", g)
    def num(s):
        m = re.match(r"(\d+)", s)
        return int(m.group(1)) if m else 0
    return (parts[0], [num(p) for p in parts[1:]], g)


def fmt_ratio(v, base):
    return "%.2fx" % (v / base) if base else "-"


def table(results):
    lines = []
    head = "| workload | jemalloc ns | " + " | ".join(a for a in ORDER if a != "jemalloc") + " |"
    lines.append(head)
    lines.append("|---" * (len(ORDER) + 1) + "|")
    for g in sorted((g for g in results if not g.startswith("kv")), key=group_key):
        r = results[g]
        base = r.get("jemalloc")
        if base is None:
            continue
        cells = [fmt_ratio(r[a], base) if a in r else "-" for a in ORDER if a != "jemalloc"]
        lines.append("| %s | %.1f | %s |" % (g, base, " | ".join(cells)))
    return "\n".join(lines)


def process_table(file, missing, intro, order):
    """A paired whole-program table from `file`: `intro(any_row)` above it,
    one row per allocator of `order` that the file has."""
    path = os.path.join(CRIT, file)
    if not os.path.exists(path):
        return missing
    r = json.load(open(path))
    lines = [intro(next(iter(r.values()))), "",
             "| global allocator | vs jemalloc (geometric mean) | 90% interval | lowest – highest pair |",
             "|---|---|---|---|"]
    for a in order:
        if a in r:
            c = r[a]
            name = "jemalloc (control: a second process)" if a == "jemalloc" else a
            lines.append("| %s | %.3fx | %.3f – %.3f | %.3f – %.3f |"
                         % (name, c["ratio"], c["ci_low"], c["ci_high"], c["low"], c["high"]))
    return "\n".join(lines)


def kv_table():
    return process_table(
        "memwatch-kv-paired.json", "(kv churn not run: python3 benches/kv_paired.py)",
        lambda r: "%d pairs of processes, %d turns of %d operations each; bare jemalloc took %.2f ms per "
                  "turn (median)." % (r["pairs"], r["rounds"], r["ops"], r["base_ms"]),
        KV_ORDER)


def tokio_table():
    return process_table(
        "memwatch-tokio-paired.json", "(tokio server not run: python3 benches/tokio_paired.py)",
        lambda r: "%d pairs of processes, %d turns of %d s each under `wrk -t1 -c16` (GET of a 1 KiB "
                  "value); bare jemalloc served %.0f requests per second (median turn). The ratio is bare "
                  "jemalloc's requests per second over the other's: above 1, the other is slower."
                  % (r["pairs"], r["turns"], r["turn_s"], r["base_rps"]),
        ["jemalloc", "memwatch-jemalloc"])


def extra():
    path = os.path.join(CRIT, "memwatch-extra.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def instructions():
    path = os.path.join(CRIT, "memwatch-instructions.json")
    if not os.path.exists(path):
        return "(instructions bench not run: it needs valgrind)"
    counts = json.load(open(path))
    base = counts.get("jemalloc")
    lines = ["| allocator | instructions per 16 B pair | vs jemalloc |", "|---|---|---|"]
    for a in ORDER:
        if a in counts:
            lines.append("| %s | %.1f | %s |" % (a, counts[a], fmt_ratio(counts[a], base)))
    sizes = sorted({int(k.split("/")[1]) for k in counts if "/" in k and k.startswith("jemalloc/")})
    hook = "jemalloc+event-hook"
    if sizes:
        lines += ["", "| pair size | jemalloc | memwatch-jemalloc | difference | vs jemalloc |"
                  " jemalloc + event hook | difference | vs jemalloc |",
                  "|---|---|---|---|---|---|---|---|"]
        for size in [16] + sizes:
            key = "" if size == 16 else "/%d" % size
            j, m = counts.get("jemalloc" + key), counts.get("memwatch-jemalloc" + key)
            h = counts.get("%s/%d" % (hook, size))
            if j and m:
                lines.append("| %s | %.1f | %.1f | +%.1f | %s | %s |" % (
                    fmt_size(size), j, m, m - j, fmt_ratio(m, j),
                    "%.1f | +%.1f | %s" % (h, h - j, fmt_ratio(h, j)) if h else "- | - | -"))
    return "\n".join(lines)


def fmt_size(size):
    if size >= 1 << 20:
        return "%d MiB" % (size >> 20)
    if size >= 1 << 10:
        return "%d KiB" % (size >> 10)
    return "%d B" % size


def paired():
    """The paired table: for each cell, the geometric mean over the layouts
    (builds at different code shifts) of each layout's median ratio, with the
    lowest and highest layout's median in brackets."""
    files = sorted(glob.glob(os.path.join(CRIT, "memwatch-paired-*.json")))
    if not files:
        return "(paired bench not run)", 0
    layouts = [json.load(open(f)) for f in files]
    cols = [a for a in ORDER if a != "jemalloc"]
    head = cols + ["thread-local check only", "static check only", "memwatch-jemalloc, 4 loop placements",
                   "jemalloc, loop moved %s B" % "/".join(str(m) for m in MOVES),
                   "memwatch-jemalloc, inlined"]
    lines = ["| workload | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]

    def cell(g, who, spread=True):
        meds = [l[g][who]["median"] for l in layouts if g in l and who in l[g]]
        if not meds:
            return "-"
        gm = math.exp(sum(math.log(m) for m in meds) / len(meds))
        if not spread or len(meds) == 1:
            return "%.3fx" % gm
        return "%.3fx (%.2f–%.2f)" % (gm, min(meds), max(meds))

    groups = {g for l in layouts for g in l}
    for g in sorted(groups, key=group_key):
        cells = [cell(g, a) for a in cols]
        cells.append(cell(g, "thread-check"))
        cells.append(cell(g, "static-check"))
        cells.append(cell(g, "memwatch-jemalloc@4"))
        cells.append(" / ".join(cell(g, "jemalloc+%dB" % pad, spread=False) for pad in MOVES))
        cells.append(cell(g, "memwatch-jemalloc-inlined"))
        lines.append("| %s | %s |" % (g, " | ".join(cells)))
    full = sum(1 for l in layouts if any("system" in c for c in l.values()))
    return "\n".join(lines), "%d builds at different code shifts (memwatch-jemalloc, and the check-only controls on 1 and 2 threads: %d)" % (full, len(layouts))


def trip_load(x):
    rows = x.get("trip_load")
    if not rows:
        return "(not run)"
    out = ["| busy threads | runs | median | p99 | max |", "|---|---|---|---|---|"]
    for r in rows:
        out.append("| %d | %d | %.2f ms | %.2f ms | %.2f ms |" % (
            r["busy"], r["runs"], r["median_ms"], r["p99_ms"], r["max_ms"]))
    return "\n".join(out)


def bar():
    """The speed bar, cell by cell: memwatch's ratio over bare jemalloc at
    most 0.01 above the static-check control's in the same run (both the
    geometric mean over the same builds); 16 B pairs at most bare + 12
    instructions; whole programs within 1.02x."""
    files = sorted(glob.glob(os.path.join(CRIT, "memwatch-paired-*.json")))
    if not files:
        return "(paired bench not run)"
    layouts = [json.load(open(f)) for f in files]

    def gm(g, who):
        meds = [l[g][who]["median"] for l in layouts if g in l and who in l[g]]
        return math.exp(sum(math.log(m) for m in meds) / len(meds)) if meds else None

    lines = ["| workload | memwatch-jemalloc | static check only | difference | at most +0.010 |",
             "|---|---|---|---|---|"]
    met = total = 0
    groups = {g for l in layouts for g in l}
    for g in sorted(groups, key=group_key):
        m, c = gm(g, "memwatch-jemalloc"), gm(g, "static-check")
        if m is None:
            continue
        if c is None:
            lines.append("| %s | %.3fx | - | - | no control at this thread count |" % (g, m))
            continue
        total += 1
        ok = m - c <= 0.010
        met += ok
        lines.append("| %s | %.3fx | %.3fx | %+.3f | %s |" % (g, m, c, m - c, "met" if ok else "**missed**"))
    lines.append("")
    lines.append("Met in %d of %d cells with a control." % (met, total))
    ipath = os.path.join(CRIT, "memwatch-instructions.json")
    if os.path.exists(ipath):
        counts = json.load(open(ipath))
        j, m = counts.get("jemalloc"), counts.get("memwatch-jemalloc")
        if j and m:
            lines.append("Instructions per 16 B pair: %.1f against bare jemalloc's %.1f, +%.1f (at most +12: %s)."
                         % (m, j, m - j, "met" if m - j <= 12 else "**missed**"))
    for file, name in [("memwatch-kv-paired.json", "key-value churn"), ("memwatch-tokio-paired.json", "tokio server under wrk")]:
        path = os.path.join(CRIT, file)
        if os.path.exists(path):
            r = json.load(open(path)).get("memwatch-jemalloc")
            if r:
                lines.append("Whole program, %s: %.3fx (at most 1.02x: %s)."
                             % (name, r["ratio"], "met" if r["ratio"] <= 1.02 else "**missed**"))
    return "\n".join(lines)


def phases():
    """memwatch and the thread-local check by the code shift mod 64: where
    the fast path falls in the 64-byte fetch windows."""
    files = glob.glob(os.path.join(CRIT, "memwatch-paired-*.json"))
    by = {}
    for f in files:
        shift = int(re.search(r"-(\d+)\.json$", f).group(1))
        by.setdefault(shift % 64, []).append(json.load(open(f)))
    if len(by) < 2:
        return "(the paired bench ran at one phase only)"
    cells = ["pair/16/1t", "pair/256/1t", "pair/4096/1t"]
    head = ["shift mod 64", "builds"] + ["%s %s" % (c, who) for c in cells for who in ("memwatch", "thread-local check")]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]

    def gm(layouts, cell, who):
        meds = [l[cell][who]["median"] for l in layouts if cell in l and who in l[cell]]
        return "%.3fx" % math.exp(sum(math.log(m) for m in meds) / len(meds)) if meds else "-"

    for phase in sorted(by):
        row = [str(phase), str(len(by[phase]))]
        for c in cells:
            row += [gm(by[phase], c, "memwatch-jemalloc"), gm(by[phase], c, "thread-check")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def overshoot():
    path = os.path.join(CRIT, "memwatch-overshoot.json")
    if not os.path.exists(path):
        return "(not run)"
    rows = json.load(open(path))
    out = ["| threads | step | past 256 MiB at the trip | bound | exit code |", "|---|---|---|---|---|"]
    for r in rows:
        out.append("| %d | %s | %d KiB | %d KiB | %d |" % (
            r["threads"], "64 KiB" if r["step"] == 65536 else "1 KiB", r["over_kib"],
            r["bound_kib"], r["code"]))
    return "\n".join(out)


def c_heap():
    path = os.path.join(CRIT, "memwatch-c-heap.json")
    if not os.path.exists(path):
        return "(not run: cargo bench -p memwatch --bench c_heap)"
    cells = json.load(open(path))
    out = ["| C pairs (`malloc` + `free`) | 1 thread | 2 threads |", "|---|---|---|"]
    for size in [16, 4096, 65536]:
        row = []
        for t in [1, 2]:
            c = cells.get("c_heap/%d/%dt" % (size, t))
            row.append("-" if c is None else "%.3fx (p10 %.3f, p90 %.3f); bare %.1f ns" % (
                c["median"], c["p10"], c["p90"], c["bare_ns"]))
        out.append("| %d B | %s |" % (size, " | ".join(row)))
    return "\n".join(out)


def kernel_trigger():
    path = os.path.join(CRIT, "memwatch-kernel-trigger.txt")
    if not os.path.exists(path):
        return "(not run: needs root and a memory cgroup)"
    return open(path).read().strip()


def machine():
    cpu = "unknown cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 30)
    return "%s, %d cores, %d GiB, Linux %s, %s" % (cpu, os.cpu_count(), mem, platform.release(), rustc)


def chart(results):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: pip install matplotlib; no chart written", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, size in zip(axes, [16, 256, 4096]):
        for a in ORDER:
            xs, ys = [], []
            for t in [1, 2, 4, 8]:
                v = results.get("pair/%d/%dt" % (size, t), {}).get(a)
                if v is not None:
                    xs.append(t)
                    ys.append(v)
            if xs:
                ax.plot(xs, ys, marker="o", label=a)
        ax.set_title("alloc+free pair, %d B" % size)
        ax.set_xlabel("threads (2 cores)")
        ax.set_ylabel("ns per pair per thread")
        ax.set_xticks([1, 2, 4, 8])
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PNG, dpi=90)
    return True


def main():
    results = load()
    t = table(results)
    if "--print" in sys.argv:
        print(paired()[0])
        print()
        print(t)
        print()
        print(instructions())
        print()
        print(kv_table())
        print(json.dumps(extra(), indent=1))
        return
    chart(results)
    x = extra()
    trip = x.get("trip", {})
    acc = x.get("accuracy", {})
    doc = open(DOC).read() if os.path.exists(DOC) else ""
    ptable, ptable_layouts = paired()
    generated = """<!-- generated by benches/report.py: everything below this line -->

Machine: %s.

### The speed bar (memwatch against the static-check control, cell by cell, from the paired table below)

%s

### Allocation overhead, paired (geometric mean over %s of each build's median per-round ratio to bare jemalloc; the lowest and highest build's median in brackets)

%s

### Allocation overhead, criterion (ratio of medians to bare jemalloc; first column in ns per operation per thread)

%s

### The same code by where it falls in 64-byte fetch windows (geometric mean of each shift's builds; the paired bench's code shift mod 64)

%s

![ns per pair against threads](benchmarks.png)

### Instructions per alloc+free pair (callgrind, jemalloc's time-driven purging off; the same on every run)

%s

### Whole program: key-value churn, one binary per global allocator, paired (`benches/kv_paired.py`)

%s

### Whole program: the tokio server (`examples/tokio-server`) under HTTP load, paired (`benches/tokio_paired.py`)

%s

### The trip: from the crossing allocation to process exit (no hooks; 0, 16 and 128 other threads of the process churning 64 KiB blocks on both cores meanwhile)

%s

### The reading against the truth (key-value churn under memwatch over jemalloc)

memwatch live bytes %s; jemalloc `stats.allocated` %s (gap %s); process RSS %s (gap %s).

### Overshoot at the trip (`benches/overshoot.py`: threads allocating in steps until the trip, 256 MiB threshold; the bound is the 16 MiB error budget plus 64 KiB and one step per thread, docs/design.md "The error bound")

%s

### C allocations through `memwatch::c_heap!`, paired against bare jemalloc (`benches/c_heap.rs`; median per-round ratio, and bare jemalloc's time per pair)

%s

### The kernel trigger: from the crossing to the hooks' start (`allocator-tests/tests/kernel_trigger.rs`: anonymous `mmap` growth at full speed in a 256 MiB cgroup v1, trigger at 0.7; the crossing as the growing thread reads the cgroup after each 256 KiB step)

%s
""" % (
        machine(), bar(), ptable_layouts, ptable, t, phases(), instructions(), kv_table(), tokio_table(), trip_load(x),
        acc.get("live", "-"), acc.get("jemalloc_allocated", "-"),
        acc.get("gap_allocated", "-"), acc.get("rss", "-"), acc.get("gap_rss", "-"), overshoot(),
        c_heap(), kernel_trigger())
    marker = "<!-- generated by benches/report.py"
    head = doc.split(marker)[0] if marker in doc else doc
    open(DOC, "w").write(head + generated)
    print("wrote", DOC)


if __name__ == "__main__":
    main()
