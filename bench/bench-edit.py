#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Benchmark: bitmap edits, qbm against qemu-img bitmap, in one run.

Images (sparse files under --dir, default /var/tmp):
  sparse  16 TiB, 64 KiB clusters, bitmap 'base' with a handful of extents
  dense   16 TiB, bitmap 'base' whose 512 data clusters are all non-empty
          (about 100,000 extents); made by writing bitmap data clusters
          into a qemu-img image and letting `qemu-img check -r all` fix the
          refcounts, then verified with `qemu-img check`
  many    1 TiB with 1000 bitmaps, some dirty
Each case runs on two identical copies, one edited by qbm, one by
qemu-img, alternating, for --reps repetitions of: add t, merge base into t
(same file), merge -b (base of a second image, made the same way: its bits
are already in t, so nothing changes), on the dense image merge alt (bits
disjoint from base: every data cluster of t changes), clear, remove.
Prints medians, qemu-img/qbm ratios and peak RSS (from /usr/bin/time -v).
Targets: qbm at least 10x faster; a sparse bitmap edited in under 10 ms.
"""
import os
import shutil
import statistics
import sys
import time

from images import (TiB, make_dense, make_many, make_sparse, parser, rss, run,
                    work_dir)
from qbmtest import qemu_img_check


def ops(tool, img, other, alt=False):
    """The edit sequence, as commands of one tool. With alt (the dense
    image), 'merge alt' ORs a disjoint bitmap into t, which then holds
    base: every data cluster changes and must be written and flushed."""
    if tool == "qbm":
        seq = [("add", ["add", img, "t"]),
               ("merge", ["merge", img, "t", "base"]),
               ("merge -b", ["merge", "-b", other, img, "t", "base"]),
               ("merge alt", ["merge", img, "t", "alt"]),
               ("clear", ["clear", img, "t"]),
               ("remove", ["remove", img, "t"])]
    else:
        seq = [("add", ["bitmap", "--add", img, "t"]),
               ("merge", ["bitmap", "--merge", "base", img, "t"]),
               ("merge -b", ["bitmap", "--merge", "base", "-b", other, "-F",
                             "qcow2", img, "t"]),
               ("merge alt", ["bitmap", "--merge", "alt", img, "t"]),
               ("clear", ["bitmap", "--clear", img, "t"]),
               ("remove", ["bitmap", "--remove", img, "t"])]
    return [o for o in seq if alt or o[0] != "merge alt"]


def bench_case(qbm, name, a, b, other, reps, alt):
    times = {}
    for _ in range(reps):
        for tool, img in (("qbm", a), ("qemu-img", b)):
            exe = qbm if tool == "qbm" else "qemu-img"
            for op, args in ops(tool, img, other, alt):
                t = time.perf_counter()
                run([exe] + args)
                times.setdefault((op, tool), []).append(
                    time.perf_counter() - t)
    # Peak RSS of the heaviest step, the merge of 'base'.
    run([qbm, "add", a, "t"])
    run(["qemu-img", "bitmap", "--add", b, "t"])
    r_q = rss([qbm, "merge", a, "t", "base"])
    r_i = rss(["qemu-img", "bitmap", "--merge", "base", b, "t"])
    run([qbm, "remove", a, "t"])
    run(["qemu-img", "bitmap", "--remove", b, "t"])
    for tool, img in (("qbm", a), ("qemu-img", b)):
        if qemu_img_check(img, ok=None).returncode != 0:
            print("qemu-img check %s failed after the %s run" % (img, tool))
            sys.exit(1)
    print("\n== %s" % name)
    print("%-10s %10s %12s %8s" % ("op", "qbm ms", "qemu-img ms", "ratio"))
    worst = None
    for op, _ in ops("qbm", a, other, alt):
        q = statistics.median(times[(op, "qbm")]) * 1000
        i = statistics.median(times[(op, "qemu-img")]) * 1000
        print("%-10s %10.1f %12.1f %7.1fx" % (op, q, i, i / q))
        worst = min(worst, i / q) if worst else i / q
    print("peak RSS of merge: qbm %.1f MiB, qemu-img %.1f MiB" % (r_q, r_i))
    return worst, max(statistics.median(times[(op, "qbm")])
                      for op, _ in ops("qbm", a, other, alt))


def main():
    args = parser(__doc__, 7, bitmaps=True).parse_args()
    qbm = os.path.abspath(args.qbm)
    d = work_dir(args, "edit")
    ok = True
    try:
        cases = []
        for name, maker, size in (("sparse 16 TiB", make_sparse, 16 * TiB),
                                  ("dense 16 TiB", make_dense, 16 * TiB),
                                  ("1000 bitmaps, 1 TiB", None, TiB)):
            a = os.path.join(d, "%s-a.qcow2" % name.split()[0])
            other = os.path.join(d, "%s-src.qcow2" % name.split()[0])
            if maker is make_dense:
                maker(a, size, alt=True)
                maker(other, size)
            elif maker:
                maker(a, size)
                maker(other, size)
            else:
                make_many(qbm, a, size, args.bitmaps)
                make_sparse(other, size)
            b = a.replace("-a.", "-b.")
            shutil.copyfile(a, b)
            cases.append((name, a, b, other))
        for name, a, b, other in cases:
            worst, slowest = bench_case(qbm, name, a, b, other, args.reps,
                                        name.startswith("dense"))
            good = worst >= 10
            print("slowest qbm step %.1f ms; worst ratio %.1fx (target >= "
                  "10x): %s" % (slowest * 1000, worst,
                                "PASS" if good else "FAIL"))
            if name.startswith("sparse"):
                fast = slowest < 0.010
                print("sparse bitmap edited in under 10 ms: %s" %
                      ("PASS" if fast else "FAIL"))
                ok &= fast
            ok &= good
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
