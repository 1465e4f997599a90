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

With --base QBM (another build, e.g. the branch an optimization starts
from), that qbm runs the same sequence on a third copy in the same loop:
each step is printed with its median and qbm / base; a step more than 10 %
slower than the base fails.
On the dense image, the "limit" of merge alt is copying as many bytes as
it writes (its data clusters) with one dd (1 MiB blocks, from the image's
page cache to a new file) plus fdatasync, timed in the same loop; target:
merge alt within 2x of it.
"""
import os
import shutil
import statistics
import sys
import time

from images import (TiB, data_clusters, make_dense, make_many, make_sparse,
                    parser, rss, run, work_dir)
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


def copy_limit(img, out):
    """dd of the bytes merge alt writes (t's data clusters, as many as the
    image's alt has) into a new file, plus fdatasync: the time of one run."""
    offs, cs = data_clusters(img, "alt")
    if os.path.exists(out):
        os.unlink(out)
    mib = len(offs) * cs // (1 << 20)
    t = time.perf_counter()
    run(["dd", "if=" + img, "of=" + out, "bs=1M", "count=%d" % mib,
         "conv=fdatasync", "status=none"])
    return time.perf_counter() - t, mib


def bench_case(qbm, name, a, b, other, reps, alt, base=None):
    """Run the sequence reps times with each tool in turn; returns (worst
    qemu-img / qbm ratio, slowest qbm step, steps slower than base,
    merge alt over its limit)."""
    times = {}
    tools = [("qbm", qbm, a), ("qemu-img", "qemu-img", b)]
    if base:
        c = a.replace("-a.", "-c.")
        shutil.copyfile(a, c)
        tools.append(("base", base, c))
    mib = 0
    # Each repetition starts with the next tool (the limit's dd among
    # them): none always runs right after another's flushes and frees.
    turns = tools + ([("dd", None, None)] if alt else [])
    for k in range(reps):
        for tool, exe, img in turns[k % len(turns):] + turns[:k % len(turns)]:
            if tool == "dd":
                t, mib = copy_limit(a, a + ".copy")
                times.setdefault(("limit", "dd"), []).append(t)
                continue
            for op, args in ops("qemu-img" if tool == "qemu-img" else "qbm",
                                img, other, alt):
                t = time.perf_counter()
                run([exe] + args)
                times.setdefault((op, tool), []).append(
                    time.perf_counter() - t)
    if os.path.exists(a + ".copy"):
        os.unlink(a + ".copy")
    # Peak RSS of the merge of 'base' and, on the dense image, of merge alt
    # (which rewrites every data cluster).
    run([qbm, "add", a, "t"])
    run(["qemu-img", "bitmap", "--add", b, "t"])
    r_q = rss([qbm, "merge", a, "t", "base"])
    r_i = rss(["qemu-img", "bitmap", "--merge", "base", b, "t"])
    if alt:
        r_qa = rss([qbm, "merge", a, "t", "alt"])
        r_ia = rss(["qemu-img", "bitmap", "--merge", "alt", b, "t"])
    run([qbm, "remove", a, "t"])
    run(["qemu-img", "bitmap", "--remove", b, "t"])
    for tool, exe, img in tools:
        if qemu_img_check(img, ok=None).returncode != 0:
            print("qemu-img check %s failed after the %s run" % (img, tool))
            sys.exit(1)

    def med(op, tool):
        return statistics.median(times[(op, tool)]) * 1000

    print("\n== %s" % name)
    print("%-10s %10s %12s %8s%s" % ("op", "qbm ms", "qemu-img ms", "ratio",
                                     "  %10s %9s" % ("base ms", "qbm/base")
                                     if base else ""))
    worst, slower, over = None, [], None
    for op, _ in ops("qbm", a, other, alt):
        q, i = med(op, "qbm"), med(op, "qemu-img")
        line = "%-10s %10.1f %12.1f %7.1fx" % (op, q, i, i / q)
        if base:
            m = med(op, "base")
            line += "  %10.1f %8.2fx" % (m, q / m)
            if q > m * 1.10:
                slower.append(op)
        print(line)
        worst = min(worst, i / q) if worst else i / q
    if alt:
        lim = med("limit", "dd")
        over = med("merge alt", "qbm") / lim
        print("limit of merge alt: dd of %d MiB + fdatasync %.1f ms; merge "
              "alt / limit = %.2fx (target <= 2x): %s" % (
                  mib, lim, over, "PASS" if over <= 2 else "FAIL"))
    print("peak RSS of merge: qbm %.1f MiB, qemu-img %.1f MiB" % (r_q, r_i))
    if alt:
        print("peak RSS of merge alt: qbm %.1f MiB, qemu-img %.1f MiB" % (
            r_qa, r_ia))
    return worst, max(statistics.median(times[(op, "qbm")])
                      for op, _ in ops("qbm", a, other, alt)), slower, over


def main():
    ap = parser(__doc__, 7, bitmaps=True)
    ap.add_argument("--base", metavar="QBM",
                    help="another qbm to compare with, in the same loop")
    args = ap.parse_args()
    qbm = os.path.abspath(args.qbm)
    base = os.path.abspath(args.base) if args.base else None
    print("load average before: %.2f %.2f %.2f" % os.getloadavg())
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
            worst, slowest, slower, over = bench_case(
                qbm, name, a, b, other, args.reps, name.startswith("dense"),
                base)
            good = worst >= 10
            if base:
                print("no step more than 10 %% slower than the base: %s" % (
                    "PASS" if not slower else "FAIL (%s)" % ", ".join(slower)))
                ok &= not slower
            if over is not None:
                ok &= over <= 2
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
    print("load average after: %.2f %.2f %.2f" % os.getloadavg())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
