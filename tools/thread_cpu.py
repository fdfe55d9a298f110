#!/usr/bin/env python3
"""CPU share of each thread of a running process, grouped by thread name.

    tools/thread_cpu.py PID [SECONDS] [--also PID2 ...]

Reads /proc/PID/task/*/stat twice, SECONDS apart (default 10), and prints
each thread name's share of one core over that time (100% = one core busy
the whole time), largest first, with its minor page faults a second (a
thread that keeps faulting is refilling memory its allocator gave back). Threads of the same name are summed (the
model pool's `rayon` threads, llvmpipe's `llvmpipe-N`). `--also` adds other
processes as one line each (the Xvfb server, for instance). Linux only.
"""
import argparse
import os
import re
import time

TICK = os.sysconf("SC_CLK_TCK")


def threads(pid):
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[tid] = (name, int(fields[11]) + int(fields[12]), int(fields[7]))
    return out


def process(pid):
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def group(name):
    # Numbered threads of one pool count as one line.
    return re.sub(r"[-_ ]?\d+$", "", name) or name


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pid", type=int)
    ap.add_argument("seconds", type=float, nargs="?", default=10.0)
    ap.add_argument("--also", type=int, nargs="*", default=[])
    args = ap.parse_args()
    before = threads(args.pid)
    before_also = {p: process(p) for p in args.also}
    t0 = time.monotonic()
    time.sleep(args.seconds)
    after = threads(args.pid)
    after_also = {p: process(p) for p in args.also}
    wall = time.monotonic() - t0
    shares = {}
    faults = {}
    for tid, (name, ticks, flt) in after.items():
        _, ticks0, flt0 = before.get(tid, (name, 0, 0))
        shares[group(name)] = shares.get(group(name), 0) + ticks - ticks0
        faults[group(name)] = faults.get(group(name), 0) + flt - flt0
    for p in args.also:
        with open(f"/proc/{p}/comm") as f:
            shares[f"[{f.read().strip()} {p}]"] = after_also[p] - before_also[p]
    total = 0.0
    for name, ticks in sorted(shares.items(), key=lambda kv: -kv[1]):
        share = 100.0 * ticks / TICK / wall
        total += share
        if share >= 0.5:
            flt = faults.get(name)
            flt = f"  {flt / wall:8.0f} faults/s" if flt is not None else ""
            print(f"{share:6.1f}%  {name:<20}{flt}")
    print(f"{total:6.1f}%  total over {wall:.1f} s ({os.cpu_count()} cores = {100 * os.cpu_count()}%)")


if __name__ == "__main__":
    main()
