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
qemu-img, alternating, for --reps repetitions of: add, merge (same file),
merge -b (from a second image of the same size), clear, remove. Prints
medians, qemu-img/qbm ratios and peak RSS (from /usr/bin/time -v).
Targets: qbm at least 10x faster; a sparse bitmap edited in under 10 ms.
"""
import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

TiB = 1 << 40


def run(cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def bitmap_table(img, name):
    """(table offset, table size, cluster size) of bitmap `name`."""
    with open(img, "rb") as f:
        h = f.read(1 << 16)
        cs = 1 << struct.unpack(">I", h[20:24])[0]
        pos = struct.unpack(">I", h[100:104])[0]
        while True:
            magic, length = struct.unpack(">II", h[pos:pos + 8])
            if magic == 0x23852875:
                nb, _, dsize, doff = struct.unpack(">IIQQ",
                                                   h[pos + 8:pos + 32])
                break
            if magic == 0:
                raise RuntimeError("no bitmaps extension")
            pos += 8 + (length + 7) // 8 * 8
        f.seek(doff)
        d = f.read(dsize)
    p = 0
    while p < len(d):
        toff, tsize, _fl, _ty, _gb, nsz, esz = struct.unpack(">QIIBBHI",
                                                           d[p:p + 24])
        n = d[p + 24 + esz:p + 24 + esz + nsz].decode()
        if n == name:
            return toff, tsize, cs
        p += (24 + esz + nsz + 7) // 8 * 8
    raise RuntimeError("no bitmap %s" % name)


def make_dense(path, size):
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)])
    run(["qemu-img", "bitmap", "--add", "-g", "64K", path, "base"])
    toff, tsize, cs = bitmap_table(path, "base")
    # One 0xff byte every 320 bytes: ~200 extents of 512 KiB per cluster.
    chunk = bytearray(cs)
    for i in range(0, cs, 320):
        chunk[i] = 0xff
    with open(path, "r+b") as f:
        end = (os.fstat(f.fileno()).st_size + cs - 1) // cs * cs
        table = b""
        for i in range(tsize):
            f.seek(end + i * cs)
            f.write(chunk)
            table += struct.pack(">Q", end + i * cs)
        f.seek(toff)
        f.write(table)
    # The new clusters have no refcount yet: QEMU's repair adds them.
    subprocess.run(["qemu-img", "check", "-q", "-r", "all", path],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run(["qemu-img", "check", "-q", path])


def make_sparse(path, size):
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)])
    run(["qemu-img", "bitmap", "--add", "-g", "64K", path, "base"])
    run(["qemu-io", "-f", "qcow2", "-c", "write 1G 64k", "-c",
         "write %d 1M" % (size // 5), "-c", "write %d 4k" % (size - 65536),
         path])


def make_many(qbm, path, size, n):
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)])
    for i in range(n):
        run([qbm, "add", path, "b%04d" % i])
        if i % 100 == 0:
            run(["qemu-io", "-f", "qcow2", "-c", "write %d 1M" % (i << 30),
                 path])
    run(["qemu-img", "bitmap", "--add", path, "base"])


def ops(tool, img, other):
    """The edit sequence, as commands of one tool."""
    if tool == "qbm":
        return [("add", ["add", img, "t"]),
                ("merge", ["merge", img, "t", "base"]),
                ("merge -b", ["merge", "-b", other, img, "t", "base"]),
                ("clear", ["clear", img, "t"]),
                ("remove", ["remove", img, "t"])]
    return [("add", ["bitmap", "--add", img, "t"]),
            ("merge", ["bitmap", "--merge", "base", img, "t"]),
            ("merge -b", ["bitmap", "--merge", "base", "-b", other, "-F",
                          "qcow2", img, "t"]),
            ("clear", ["bitmap", "--clear", img, "t"]),
            ("remove", ["bitmap", "--remove", img, "t"])]


def rss(cmd):
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    for line in p.stderr.splitlines():
        if "Maximum resident set size" in line:
            return int(line.split(":")[1]) / 1024
    return float("nan")


def bench_case(qbm, name, a, b, other, reps):
    times = {}
    for _ in range(reps):
        for tool, img in (("qbm", a), ("qemu-img", b)):
            exe = qbm if tool == "qbm" else "qemu-img"
            for op, args in ops(tool, img, other):
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
        c = subprocess.run(["qemu-img", "check", img], stdout=subprocess.PIPE,
                           text=True)
        if c.returncode != 0:
            print("qemu-img check %s failed after the %s run" % (img, tool))
            sys.exit(1)
    print("\n== %s" % name)
    print("%-10s %10s %12s %8s" % ("op", "qbm ms", "qemu-img ms", "ratio"))
    worst = None
    for op, _ in ops("qbm", a, other):
        q = statistics.median(times[(op, "qbm")]) * 1000
        i = statistics.median(times[(op, "qemu-img")]) * 1000
        print("%-10s %10.1f %12.1f %7.1fx" % (op, q, i, i / q))
        worst = min(worst, i / q) if worst else i / q
    print("peak RSS of merge: qbm %.1f MiB, qemu-img %.1f MiB" % (r_q, r_i))
    return worst, max(statistics.median(times[(op, "qbm")])
                      for op, _ in ops("qbm", a, other))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--qbm", default=os.path.join(here, "..", "build",
                                                  "tools", "qbm"))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dir", default=os.environ.get("QBM_BENCH_DIR",
                                                    "/var/tmp"))
    ap.add_argument("--bitmaps", type=int, default=1000)
    args = ap.parse_args()
    qbm = os.path.abspath(args.qbm)
    d = tempfile.mkdtemp(prefix="qbm-bench-edit-", dir=args.dir)
    ok = True
    try:
        print("building images in %s ..." % d, flush=True)
        cases = []
        for name, maker, size in (("sparse 16 TiB", make_sparse, 16 * TiB),
                                  ("dense 16 TiB", make_dense, 16 * TiB),
                                  ("1000 bitmaps, 1 TiB", None, TiB)):
            a = os.path.join(d, "%s-a.qcow2" % name.split()[0])
            other = os.path.join(d, "%s-src.qcow2" % name.split()[0])
            if maker:
                maker(a, size)
                maker(other, size)
            else:
                make_many(qbm, a, size, args.bitmaps)
                make_sparse(other, size)
            b = a.replace("-a.", "-b.")
            shutil.copyfile(a, b)
            cases.append((name, a, b, other))
        for name, a, b, other in cases:
            worst, slowest = bench_case(qbm, name, a, b, other, args.reps)
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
