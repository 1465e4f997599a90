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
step and overall (sum of medians), in two runs:
  held  another descriptor keeps the device open (as a host's udev, LVM or
        multipath daemons may), so its page cache survives between qbm
        runs as a file's does: this measures qbm's device path. Target:
        within 1.1x.
  cold  nothing else has it open: Linux drops a block device's page cache
        when its last opener closes it (close() alone takes milliseconds
        here), so each qbm run reads the device again through the loop
        driver. Shown for information: the cost is the kernel's, and on a
        real disk it is a disk read.
Needs root and losetup.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile

from images import TiB, make_dense, timed
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


def measure(qbm, dev, f, reps):
    """{(step, "device"|"file"): [seconds]}, device and file alternating."""
    times = {}
    for _ in range(reps):
        for kind, img in (("device", dev), ("file", f)):
            for name, cmd in steps(img):
                times.setdefault((name, kind), []).append(
                    timed([qbm] + cmd))
    return times


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
    args = ap.parse_args()
    require_loop()
    qbm = os.path.abspath(args.qbm)
    d = tempfile.mkdtemp(prefix="qbm-bench-device-", dir=args.dir)
    try:
        src = os.path.join(d, "src.qcow2")
        make_dense(src, 16 * TiB, alt=True)
        size = os.path.getsize(src)
        with LoopDevice(d, size + 256 * MiB, "dev", fill=b"\0") as loop:
            dev = loop.node
            f = os.path.join(d, "file.qcow2")
            for dst in (dev, f):
                with open(src, "rb") as i, open(dst, "r+b" if dst == dev
                                                else "wb") as o:
                    shutil.copyfileobj(i, o, 1 << 20)
                    o.flush()
                    os.fsync(o.fileno())
            results = {}
            for mode in ("held", "cold"):
                hold = os.open(dev, os.O_RDONLY) if mode == "held" else None
                try:
                    results[mode] = measure(qbm, dev, f, args.reps)
                finally:
                    if hold is not None:
                        os.close(hold)
            for img in (dev, f):
                qemu_img_check(img, "-q")
        ratio = {m: report(m, results[m]) for m in ("held", "cold")}
        print("target: held device within 1.1x of the file: %.2fx: %s" % (
            ratio["held"], "PASS" if ratio["held"] <= 1.1 else "FAIL"))
        return 0 if ratio["held"] <= 1.1 else 1
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
