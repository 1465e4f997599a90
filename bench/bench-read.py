#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Benchmark: reading bitmaps, qbm against QEMU's tools, in one run.

  dump   qbm dump (human and --output=json) vs qemu-nbd -r -B + nbdinfo --map
         on a 16 TiB image with a sparse and with a dense 64 KiB bitmap
  info   qbm info (human and json) vs qemu-img info on a 1 TiB image with
         1000 bitmaps
Each pair alternates for --reps repetitions; medians, ratios (QEMU / qbm)
and peak RSS are printed. Targets: dump of the dense bitmap and info with
1000 bitmaps at least 20x faster than QEMU's tools.
"""
import os
import shutil
import statistics
import sys

from images import (TiB, make_dense, make_many, make_sparse, parser, rss,
                    timed, work_dir)
from qbmtest import dirty_map_cmd


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
        cases = []
        for label, img in (("sparse", sparse), ("dense", dense)):
            cases.append(("dump %s 16 TiB" % label, [qbm, "dump", img, "base"],
                          dirty_map_cmd(img, "base", as_json=False),
                          label == "dense"))
            cases.append(("dump --output=json %s" % label,
                          [qbm, "dump", "--output=json", img, "base"],
                          dirty_map_cmd(img, "base"), False))
        cases.append(("info, %d bitmaps" % args.bitmaps, [qbm, "info", many],
                      ["qemu-img", "info", many], True))
        cases.append(("info --output=json, %d bitmaps" % args.bitmaps,
                      [qbm, "info", "--output=json", many],
                      ["qemu-img", "info", "--output=json", many], False))
        print("%-34s %10s %10s %8s %12s %12s" % (
            "case", "qbm s", "QEMU s", "ratio", "qbm RSS", "QEMU RSS"))
        for name, ours, theirs, target in cases:
            a, b = [], []
            for _ in range(args.reps):
                a.append(timed(ours))
                b.append(timed(theirs))
            ma, mb = statistics.median(a), statistics.median(b)
            ra, rb = rss(ours), rss(theirs)
            print("%-34s %10.4f %10.4f %7.1fx %8.1f MiB %8.1f MiB%s" % (
                name, ma, mb, mb / ma, ra, rb,
                ("  target 20x: " + ("PASS" if mb / ma >= 20 else "FAIL"))
                if target else ""), flush=True)
            if target:
                ok &= mb / ma >= 20
        null.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
