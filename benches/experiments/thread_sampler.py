#!/usr/bin/env python3
"""Where a process's threads spend a load: run CMD, sample its threads every few milliseconds
from /proc until it exits, and write a summary to OUT.

Usage: thread_sampler.py OUT [--interval-ms N] -- CMD [ARG ...]   (exits with CMD's status)

For each thread (grouped by name, digits dropped): the samples in which it ran (R), slept (S)
or waited uninterruptibly (D), and its user and system CPU seconds; for the samples of threads
not running, the kernel stacks they waited in (/proc/PID/task/TID/stack, root only: the top
frames below the scheduler), most frequent first. A lock the load's threads contend for (the
address space's, a socket's) shows as a stack many samples share. No perf needed: the GPU
machine has none.
"""
import collections
import os
import re
import signal
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")
SKIP = ("__schedule", "schedule", "schedule_timeout", "schedule_hrtimeout", "io_schedule",
        "preempt_schedule", "__cond_resched", "entry_SYSCALL", "do_syscall_64")


def group(comm):
    return re.sub(r"[0-9]+", "#", comm.strip())


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def frames(text):
    out = []
    for line in (text or "").splitlines():
        name = line.split("]", 1)[-1].strip().split("+", 1)[0]
        if name and not name.startswith(SKIP):
            out.append(name)
    return out


def main():
    args = sys.argv[1:]
    if "--" not in args or args.index("--") == 0 or args.index("--") == len(args) - 1:
        sys.exit(__doc__)
    out, rest = args[0], args[args.index("--") + 1:]
    interval = 0.005
    if "--interval-ms" in args[: args.index("--")]:
        interval = float(args[args.index("--interval-ms") + 1]) / 1000
    child = subprocess.Popen(rest)
    pid = child.pid

    # Killed (a race's timeout): the command goes too, and what was sampled is still written.
    def stop(signum, _frame):
        child.send_signal(signum)
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    states = collections.defaultdict(collections.Counter)
    stacks = collections.defaultdict(collections.Counter)
    cpu = {}
    samples = 0
    t0 = time.monotonic()
    try:
        while child.poll() is None:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                break
            samples += 1
            for tid in tids:
                stat = read(f"/proc/{pid}/task/{tid}/stat")
                if not stat:
                    continue
                comm = stat[stat.index("(") + 1: stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2:].split()
                state, utime, stime = fields[0], int(fields[11]), int(fields[12])
                g = group(comm)
                states[g][state] += 1
                cpu[tid] = (g, utime, stime)
                if state != "R":
                    top = frames(read(f"/proc/{pid}/task/{tid}/stack"))[:4]
                    if top:
                        stacks[g][" < ".join(top)] += 1
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        if child.poll() is None:
            child.kill()
        rc = child.wait()
        write(out, rest, rc, time.monotonic() - t0, samples, interval, states, stacks, cpu)
    # The command's status as a shell gives it (a signal N: 128 + N).
    sys.exit(rc if rc >= 0 else 128 - rc)


def write(out, rest, rc, wall, samples, interval, states, stacks, cpu):
    by_group = collections.defaultdict(lambda: [0, 0, 0])
    for g, u, s in cpu.values():
        by_group[g][0] += 1
        by_group[g][1] += u
        by_group[g][2] += s
    with open(out, "w") as f:
        f.write(f"command: {' '.join(rest)}\nexit {rc}, {wall:.2f} s, {samples} samples "
                f"every {interval * 1000:.0f} ms\n\n")
        f.write("threads (digits as #): count, samples R / S / D, user s, system s (as last "
                "sampled: a thread's time after its last sample is not counted)\n")
        for g, (n, u, s) in sorted(by_group.items(), key=lambda x: -(x[1][1] + x[1][2])):
            c = states[g]
            f.write(f"  {g:<24} {n:>3}  R {c['R']:>6}  S {c['S']:>6}  D {c['D']:>6}  "
                    f"user {u / HZ:7.2f}  sys {s / HZ:7.2f}\n")
        f.write("\nkernel stacks of threads not running (top frames), per thread group\n")
        for g in sorted(stacks, key=lambda g: -sum(stacks[g].values())):
            f.write(f"  {g}\n")
            for stack, n in stacks[g].most_common(12):
                f.write(f"    {n:>6}  {stack}\n")


if __name__ == "__main__":
    main()
