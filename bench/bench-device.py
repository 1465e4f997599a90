#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Benchmark: the same work on an image on a block device and on a file.

One image (16 TiB, 64 KiB clusters, bitmap 'base' with every one of its 512
data clusters non-empty, about 100,000 extents, and 'alt' with disjoint
bits) is copied byte for byte onto a loop device and into a file, both
under --dir (default /var/tmp). The device is reached only through a
private node made with mknod in a temporary directory, and detached
afterwards. Alternating device and file, --reps times: dump base (human),
info, add t, merge base into t (shared clusters), merge alt into t (every
data cluster of t changes: written and flushed), clear t, remove t, and the
same merge with --dry-run. Prints the medians, the device/file ratio per
step and overall (sum of medians), in two runs, each comparing like with
like:
  held  another descriptor keeps the device open (as a host's udev, LVM or
        multipath daemons may), so its page cache survives between qbm
        runs as the file's does: warm device against warm file.
  cold  before every timed command the pages of the image file, of the
        device and of the loop device's backing file are written back
        (fsync) and evicted (POSIX_FADV_DONTNEED), checked with fincore
        where installed: each qbm run reads the image from storage on both
        sides (the device through the loop driver from its backing file's
        storage). Nothing else holds the device open, so Linux also drops
        its cache at qbm's last close, as it would on a host.
The loop driver reads and writes its backing file with O_DIRECT (losetup
--direct-io=on, checked in sysfs), so the device's data is cached once, in
the device's own page cache, as on a disk, an LVM volume or a SAN LUN;
--buffered-loop measures the default buffered loop device instead, whose
data also passes through the backing file's page cache (a layer no real
device has).
Target for both runs: device within 1.1x of the file (sum of medians).
Needs root and losetup.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile

from images import TiB, evict, make_dense, timed
from qbmtest import LoopDevice, MiB, qemu_img_check, require_loop


def steps(img):
    return [("dump", ["dump", img, "base"]),
            ("info", ["info", img]),
            ("add", ["add", img, "t"]),
            ("merge", ["merge", img, "t", "base"]),
            ("merge alt", ["merge", img, "t", "alt"]),
            ("dry-run", ["merge", "--dry-run", img, "t", "base"]),
            ("clear", ["clear", img, "t"]),
            ("remove", ["remove", img, "t"])]


def loop_dio(dev):
    """Whether the loop device reads its backing file with O_DIRECT."""
    name = os.path.basename(dev)
    with open("/sys/block/%s/loop/dio" % name) as f:
        return f.read().strip() == "1"


def measure(qbm, dev, f, reps, cold=None):
    """({(step, "device"|"file"): [seconds]}, pages found cached after
    eviction or None), device and file alternating. cold: {"device":
    [paths], "file": [paths]} to evict before each timed command."""
    times = {}
    left = None
    for _ in range(reps):
        for kind, img in (("device", dev), ("file", f)):
            for name, cmd in steps(img):
                if cold:
                    n = evict(cold[kind])
                    if n is not None:
                        left = (left or 0) + n
                times.setdefault((name, kind), []).append(
                    timed([qbm] + cmd))
    return times, left


def report(mode, times):
    """Print the medians of one run; the overall device/file ratio."""
    print("\n== device %s" % mode)
    print("%-10s %10s %10s %7s" % ("step", "device ms", "file ms", "ratio"))
    total = {"device": 0.0, "file": 0.0}
    for name, _ in steps("x"):
        m = {k: statistics.median(times[(name, k)]) * 1000
             for k in ("device", "file")}
        for k in m:
            total[k] += m[k]
        print("%-10s %10.1f %10.1f %6.2fx" % (name, m["device"], m["file"],
                                               m["device"] / m["file"]))
    ratio = total["device"] / total["file"]
    print("all steps: device %.1f ms, file %.1f ms: %.2fx" % (
        total["device"], total["file"], ratio))
    return ratio


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--qbm", default=os.path.join(here, "..", "build",
                                                  "tools", "qbm"))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dir", default=os.environ.get("QBM_BENCH_DIR",
                                                    "/var/tmp"))
    ap.add_argument("--buffered-loop", action="store_true",
                    help="a buffered loop device (default: direct I/O)")
    args = ap.parse_args()
    require_loop()
    qbm = os.path.abspath(args.qbm)
    print("load average at start: %.2f %.2f %.2f" % os.getloadavg())
    d = tempfile.mkdtemp(prefix="qbm-bench-device-", dir=args.dir)
    try:
        src = os.path.join(d, "src.qcow2")
        make_dense(src, 16 * TiB, alt=True)
        size = os.path.getsize(src)
        with LoopDevice(d, size + 256 * MiB, "dev", fill=b"\0",
                        direct_io=not args.buffered_loop) as loop:
            dev = loop.node
            print("loop device: %s I/O on its backing file" % (
                "direct" if loop_dio(loop.dev) else "buffered"))
            if loop_dio(loop.dev) == args.buffered_loop:
                print("losetup did not set the loop device's direct I/O "
                      "mode as asked", file=sys.stderr)
                return 1
            f = os.path.join(d, "file.qcow2")
            for dst in (dev, f):
                with open(src, "rb") as i, open(dst, "r+b" if dst == dev
                                                else "wb") as o:
                    shutil.copyfileobj(i, o, 1 << 20)
                    o.flush()
                    os.fsync(o.fileno())
            results = {}
            left = {}
            for mode in ("held", "cold"):
                hold = os.open(dev, os.O_RDONLY) if mode == "held" else None
                cold = ({"device": [dev, loop.backing], "file": [f]}
                        if mode == "cold" else None)
                try:
                    results[mode], left[mode] = measure(qbm, dev, f,
                                                        args.reps, cold)
                finally:
                    if hold is not None:
                        os.close(hold)
            for img in (dev, f):
                qemu_img_check(img, "-q")
        print("load average at end: %.2f %.2f %.2f" % os.getloadavg())
        if left["cold"] is None:
            print("cold: fincore not installed, eviction not checked")
        else:
            print("cold: pages still cached after eviction, all commands: "
                  "%d" % left["cold"])
        ratio = {m: report(m, results[m]) for m in ("held", "cold")}
        ok = True
        for mode, what in (("held", "held device vs warm file"),
                           ("cold", "cold device vs cold file")):
            passed = ratio[mode] <= 1.1
            ok = ok and passed
            print("target: %s within 1.1x: %.2fx: %s" % (
                what, ratio[mode], "PASS" if passed else "FAIL"))
        return 0 if ok else 1
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
