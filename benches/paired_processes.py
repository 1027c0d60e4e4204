"""What the two paired whole-program scripts share (`kv_paired.py`,
`tokio_paired.py`): turns taken by two live processes in alternating order,
and the summary over fresh pairs of processes."""

import math


def median(xs):
    return sorted(xs)[len(xs) // 2]


def turns(run_base, run_other, n):
    """`n` turns of both, alternating which goes first (so that neither is
    always the one that runs right after the other): [(base, other)]."""
    out = []
    for i in range(n):
        if i % 2 == 0:
            b = run_base()
            out.append((b, run_other()))
        else:
            o = run_other()
            out.append((run_base(), o))
    return out


def summary(medians):
    """The geometric mean of the pairs' medians with a 90% interval (normal
    approximation in log space: how far one run's figure can be trusted),
    and the lowest and highest pair."""
    logs = [math.log(m) for m in medians]
    mean = sum(logs) / len(logs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / max(len(logs) - 1, 1))
    half = 1.645 * sd / math.sqrt(len(logs))
    return {"ratio": math.exp(mean), "ci_low": math.exp(mean - half), "ci_high": math.exp(mean + half),
            "low": min(medians), "high": max(medians)}


def line(label, s):
    return "%-18s %.3fx (90%% interval %.3f-%.3f; pairs %.3f-%.3f)" % (
        label, s["ratio"], s["ci_low"], s["ci_high"], s["low"], s["high"])
