#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Benchmark: qbm rebuild against merely reading its inputs.

For each disk size (1 GiB and 8 GiB by default), builds a sparse qcow2
disk about 25 % allocated by scattered writes of 64 KiB to 4 MiB (so its
data clusters lie in write order, not guest order, as a VM leaves them),
a full backup (qbm extract --full, or with --raw-full a sparse raw one by
qemu-img convert), two incrementals (qbm extract
--rotate, ~2 % of the disk each), then ~5 % more writes and the checkpoint
left in use, as a crash leaves it. Then times in one run, alternating:

  rebuild  qbm rebuild DISK CK FULL INC1 INC2 (its commit included)
  cat      cat DISK FULL INC1 INC2 > /dev/null: reading every input once
  cat-par  one cat per input, all at once: reading them with several
           requests in flight, as rebuild does (a harder limit)

Page cache: before every timed command the inputs are written back and
evicted from the page cache (fsync + posix_fadvise(POSIX_FADV_DONTNEED)
on each file), so both start with none of their inputs cached; the rest
of the machine's cache is left alone (no drop_caches). Prints medians,
the ratios rebuild/cat (goal: at most 2) and rebuild/cat-par, and
rebuild's peak RSS.
"""
import os
import random
import shutil
import statistics
import sys
import time

from images import evict, parser, rss as peak_rss, run, work_dir
from qbmtest import GiB, MiB, qemu_img_create, set_in_use


def write_scattered(img, size, total, rng):
    """Random-pattern writes at random offsets, about total bytes."""
    cmds, done = [], 0
    while done < total:
        length = rng.choice([64 * 1024, 256 * 1024, MiB, 4 * MiB])
        off = rng.randrange(0, size - length) // 65536 * 65536
        cmds += ["-c", "write -P %d %d %d" % (rng.randrange(1, 255), off,
                                               length)]
        done += length
        if len(cmds) > 400:
            run(["qemu-io", "-f", "qcow2"] + cmds + [img])
            cmds = []
    if cmds:
        run(["qemu-io", "-f", "qcow2"] + cmds + [img])


def build(qbm, d, rng, size, raw_full):
    disk = os.path.join(d, "disk.qcow2")
    qemu_img_create(disk, size)
    write_scattered(disk, size, size // 4, rng)
    run([qbm, "add", disk, "ck0"])
    if raw_full:
        full = os.path.join(d, "full.raw")
        run(["qemu-img", "convert", "-O", "raw", disk, full])
    else:
        full = os.path.join(d, "full.qcow2")
        run([qbm, "extract", "--full", "-o", full, disk])
    incs = []
    for i in (1, 2):
        write_scattered(disk, size, size // 50, rng)
        inc = os.path.join(d, "inc%d.qcow2" % i)
        run([qbm, "extract", "--rotate", "ck%d" % i, "-o", inc, disk,
             "ck%d" % (i - 1)])
        incs.append(inc)
    write_scattered(disk, size, size // 20, rng)
    set_in_use(disk, "ck2")
    return disk, full, incs


def timed(cmd, inputs):
    evict(inputs)
    t = time.monotonic()
    run(cmd)
    return time.monotonic() - t


def bench(qbm, args, size):
    rng = random.Random(size)
    d = work_dir(args, "rebuild")
    try:
        disk, full, incs = build(qbm, d, rng, size, args.raw_full)
        inputs = [disk, full] + incs
        total = sum(os.path.getsize(f) for f in inputs)
        print("%d GiB disk: inputs %s MiB (%.0f MiB in all)" % (
            size // GiB, ", ".join("%.0f" % (os.path.getsize(f) / MiB)
                                   for f in inputs), total / MiB),
              flush=True)
        rebuild = [qbm, "rebuild", disk, "ck2", full] + incs
        cat = ["sh", "-c", 'exec cat "$@" > /dev/null', "cat"] + inputs
        cat_par = ["sh", "-c", 'for f; do cat "$f" > /dev/null & done; '
                   'wait', "cat"] + inputs
        cases = [("rebuild", rebuild), ("cat", cat), ("cat-par", cat_par)]
        times = {n: [] for n, _ in cases}
        for rep in range(args.reps):
            for n, cmd in cases:
                times[n].append(timed(cmd, inputs))
            print("  rep %d: %s" % (rep + 1, ", ".join(
                "%s %.2fs" % (n, times[n][-1]) for n, _ in cases)),
                flush=True)
        med = {n: statistics.median(v) for n, v in times.items()}
        evict(inputs)
        rss = peak_rss(rebuild)
        ratio = med["rebuild"] / med["cat"]
        print("  median: %s" % ", ".join(
            "%s %.2fs (%.0f MiB/s of input)" % (n, med[n],
                                                total / MiB / med[n])
            for n, _ in cases))
        print("  rebuild/cat %.2fx (goal <= 2x): %s; rebuild/cat-par %.2fx; "
              "rebuild peak RSS %.0f MiB" % (
                  ratio, "PASS" if ratio <= 2 else "FAIL",
                  med["rebuild"] / med["cat-par"], rss), flush=True)
        return ratio <= 2
    finally:
        if args.keep:
            print("kept %s" % d)
        else:
            shutil.rmtree(d, ignore_errors=True)


def main():
    ap = parser(__doc__, 3)
    ap.add_argument("--sizes", default="1,8",
                    help="disk sizes in GiB, comma separated (default 1,8)")
    ap.add_argument("--raw-full", action="store_true",
                    help="a sparse raw full backup instead of a qcow2 one")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    qbm = os.path.abspath(args.qbm)
    ok = True
    for s in args.sizes.split(","):
        ok = bench(qbm, args, int(s) * GiB) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
