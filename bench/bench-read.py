#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Benchmark: reading bitmaps, qbm against QEMU's tools, in one run.

  dump   qbm dump (human and --output=json) vs qemu-nbd -r -B + nbdinfo --map
         on a 16 TiB image with a sparse and with a dense 64 KiB bitmap
  info   qbm info (human and json) vs qemu-img info on a 1 TiB image with
         1000 bitmaps
Each pair alternates for --reps repetitions; medians, ratios (QEMU / qbm)
and peak RSS are printed. Targets: dump of the dense bitmap at least 30x
faster than QEMU's tools and within 2x of its limit; info with 1000
bitmaps at least 20x faster.
The limit of the dense dump, timed in the same loop: reading the bitmap's
data clusters (one dd in 256 KiB blocks from the page cache, as many bytes
as the clusters hold, from the first of them) plus writing as many bytes
as the dump prints (a second dd, from /dev/zero), both to the sink qbm
writes to (/dev/null), minus one process start (/bin/true): what any tool
that reads the bitmap and prints its extents must pay.
"""
import os
import shutil
import statistics
import subprocess
import sys

from images import (TiB, data_clusters, make_dense, make_many, make_sparse,
                    parser, rss, timed, work_dir)
from qbmtest import dirty_map_cmd


def run_out(cmd):
    """The standard output of cmd, as bytes."""
    return subprocess.run(cmd, stdout=subprocess.PIPE, check=True).stdout


def main():
    args = parser(__doc__, 7, bitmaps=True).parse_args()
    qbm = os.path.abspath(args.qbm)
    d = work_dir(args, "read")
    ok = True
    try:
        sparse = os.path.join(d, "sparse.qcow2")
        dense = os.path.join(d, "dense.qcow2")
        many = os.path.join(d, "many.qcow2")
        make_sparse(sparse, 16 * TiB)
        make_dense(dense, 16 * TiB)
        make_many(qbm, many, TiB, args.bitmaps)
        null = open(os.devnull, "w")
        print("load average before: %.2f %.2f %.2f" % os.getloadavg())
        offs, cs = data_clusters(dense, "base")
        out_bytes = len(run_out([qbm, "dump", dense, "base"]))
        limit = [["dd", "if=" + dense, "of=/dev/null", "bs=256K",
                  "iflag=skip_bytes,count_bytes", "skip=%d" % min(offs),
                  "count=%d" % (len(offs) * cs), "status=none"],
                 ["dd", "if=/dev/zero", "of=/dev/null", "bs=256K",
                  "iflag=count_bytes", "count=%d" % out_bytes,
                  "status=none"],
                 ["/bin/true"]]
        cases = []
        for label, img in (("sparse", sparse), ("dense", dense)):
            cases.append(("dump %s 16 TiB" % label, [qbm, "dump", img, "base"],
                          dirty_map_cmd(img, "base", as_json=False),
                          30 if label == "dense" else 0))
            cases.append(("dump --output=json %s" % label,
                          [qbm, "dump", "--output=json", img, "base"],
                          dirty_map_cmd(img, "base"), 0))
        cases.append(("info, %d bitmaps" % args.bitmaps, [qbm, "info", many],
                      ["qemu-img", "info", many], 20))
        cases.append(("info --output=json, %d bitmaps" % args.bitmaps,
                      [qbm, "info", "--output=json", many],
                      ["qemu-img", "info", "--output=json", many], 0))
        print("%-34s %10s %10s %8s %12s %12s" % (
            "case", "qbm s", "QEMU s", "ratio", "qbm RSS", "QEMU RSS"))
        for name, ours, theirs, target in cases:
            a, b, lim = [], [], []
            for _ in range(args.reps):
                a.append(timed(ours))
                b.append(timed(theirs))
                if target == 30:
                    t = [timed(c) for c in limit]
                    lim.append(t[0] + t[1] - t[2])
            ma, mb = statistics.median(a), statistics.median(b)
            ra, rb = rss(ours), rss(theirs)
            print("%-34s %10.4f %10.4f %7.1fx %8.1f MiB %8.1f MiB%s" % (
                name, ma, mb, mb / ma, ra, rb,
                ("  target %dx: " % target + ("PASS" if mb / ma >= target
                                              else "FAIL"))
                if target else ""), flush=True)
            if target:
                ok &= mb / ma >= target
            if lim:
                ml = statistics.median(lim)
                print("  limit: read %d MiB of clusters + write %d KiB of "
                      "output %.4f s; dump / limit = %.2fx (target <= 2x): "
                      "%s" % (len(offs) * cs >> 20, out_bytes >> 10, ml,
                              ma / ml, "PASS" if ma / ml <= 2 else "FAIL"),
                      flush=True)
                ok &= ma / ml <= 2
        null.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print("load average after: %.2f %.2f %.2f" % os.getloadavg())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
