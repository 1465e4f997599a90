#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Benchmark: rebuilding a disk from a full backup plus incrementals.

Builds an 8 GiB disk with about 1.5 GiB of data, a full backup of it, and
five incremental backups of about 200 MB each (qbm extract --rotate), then
times in one run, alternating, each producing a durable (flushed) raw disk:

  qbm      qbm restore -o OUT FULL INC1..INC5
  convert  qemu-img rebase -u (link the chain) + qemu-img convert -W -m 16
  commit   qemu-img commit down the chain (INC5 into ... into FULL)
  limit    copy_file_range + fdatasync of exactly the bytes qbm must write
  consolidate  qbm consolidate FULL INC1..INC5: the same job as commit
           (the full backup updated in place, crash-safely; a qcow2, not a
           raw disk), so it is compared with commit

and prints medians, the ratios against qbm and the peak RSS of each.
Targets: qbm at least 1.5x faster than the best qemu-img path, and within
1.3x of the limit. Note that commit writes only the incrementals' data (into
the full backup, in place) while a restore writes the whole disk, so on a
fast disk commit can beat any restore; consolidate is its counterpart.
Setup copies (for commit and consolidate, which change their input) are
not timed.
"""
import json
import os
import random
import shutil
import statistics
import sys
import time

from images import parser, rss as peak_rss, run, work_dir
from qbmtest import GiB, MiB, qemu_img, qemu_img_create


def fdatasync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def drop_caches():
    """Cold caches make runs comparable; harmless when not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def write_scattered(img, size, total, rng, chunk_choices):
    """qemu-io writes of random patterns at random offsets, ~total bytes."""
    cmds, done = [], 0
    while done < total:
        length = rng.choice(chunk_choices)
        off = rng.randrange(0, size - length) // 65536 * 65536
        cmds += ["-c", "write -P %d %d %d" % (rng.randrange(1, 255), off,
                                               length)]
        done += length
        if len(cmds) > 400:
            run(["qemu-io", "-f", "qcow2"] + cmds + [img])
            cmds = []
    if cmds:
        run(["qemu-io", "-f", "qcow2"] + cmds + [img])


def build(qbm, d, rng, size, full_data, inc_data, nincs):
    disk = os.path.join(d, "disk.qcow2")
    qemu_img_create(disk, size)
    write_scattered(disk, size, full_data, rng, [MiB, 4 * MiB, 16 * MiB])
    run([qbm, "add", disk, "ck0"])
    full = os.path.join(d, "full.qcow2")
    run([qbm, "extract", "--full", "-o", full, disk])
    incs = []
    for i in range(1, nincs + 1):
        write_scattered(disk, size, inc_data, rng, [64 * 1024, MiB, 4 * MiB])
        inc = os.path.join(d, "inc%d.qcow2" % i)
        run([qbm, "extract", "--rotate", "ck%d" % i, "-o", inc, disk,
             "ck%d" % (i - 1)])
        incs.append(inc)
    return disk, full, incs


def timed(fn):
    drop_caches()
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def main():
    ap = parser(__doc__, 3)
    ap.add_argument("--quick", action="store_true",
                    help="1 GiB disk, 200 MB data, 5 x 20 MB incrementals")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    qbm = os.path.abspath(args.qbm)
    rng = random.Random(1)
    if args.quick:
        size, full_data, inc_data = GiB, 200 * MiB, 20 * MiB
    else:
        size, full_data, inc_data = 8 * GiB, 1536 * MiB, 200 * MiB
    d = work_dir(args, "restore")
    try:
        disk, full, incs = build(qbm, d, rng, size, full_data, inc_data, 5)
        sizes = [os.path.getsize(f) for f in [full] + incs]
        print("full %.0f MiB, incrementals %s MiB" % (
            sizes[0] / MiB, ", ".join("%.0f" % (s / MiB) for s in sizes[1:])))
        out = os.path.join(d, "out.raw")
        # The bytes qbm writes: the data extents of the restored disk.
        run([qbm, "restore", "-o", out, full] + incs)
        mp = json.loads(qemu_img("map", "-f", "raw", "--output=json",
                                 out).stdout)
        need = sum(e["length"] for e in mp if e["data"])
        # The limit's source: those bytes, back to back in one file.
        src = os.path.join(d, "limit-src")
        fin = os.open(out, os.O_RDONLY)
        fsrc = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for e in mp:
            if e["data"]:
                left, off = e["length"], e["start"]
                while left:
                    n = os.copy_file_range(fin, fsrc, left, off)
                    left -= n
                    off += n
        os.close(fin)
        os.close(fsrc)
        print("restored disk holds %.0f MiB of data" % (need / MiB))

        def t_qbm():
            run([qbm, "restore", "-o", out, full] + incs)

        def t_convert():
            prev = full
            for i, inc in enumerate(incs):
                c = os.path.join(d, "c%d.qcow2" % i)
                run(["qemu-img", "rebase", "-u", "-b", os.path.basename(prev),
                     "-F", "qcow2", c])
                prev = c
            run(["qemu-img", "convert", "-W", "-m", "16", "-O", "raw", prev,
                 out])
            fdatasync(out)

        def t_commit():
            for i in range(len(incs) - 1, -1, -1):
                run(["qemu-img", "commit", "-q", os.path.join(
                    d, "m%d.qcow2" % i)])
            fdatasync(os.path.join(d, "mfull.qcow2"))

        def t_limit():
            fin = os.open(src, os.O_RDONLY)
            fout = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            left = need
            while left:
                n = os.copy_file_range(fin, fout, min(left, 1 << 30))
                if n <= 0:
                    break
                left -= n
            os.fdatasync(fout)
            os.close(fin)
            os.close(fout)

        def t_consolidate():
            run([qbm, "consolidate", os.path.join(d, "cfull.qcow2")] + incs)

        def prep_consolidate():
            shutil.copyfile(full, os.path.join(d, "cfull.qcow2"))

        def prep_convert():
            for i, inc in enumerate(incs):
                shutil.copyfile(inc, os.path.join(d, "c%d.qcow2" % i))

        def prep_commit():
            shutil.copyfile(full, os.path.join(d, "mfull.qcow2"))
            prev = "mfull.qcow2"
            for i, inc in enumerate(incs):
                m = os.path.join(d, "m%d.qcow2" % i)
                shutil.copyfile(inc, m)
                run(["qemu-img", "rebase", "-u", "-b", prev, "-F", "qcow2",
                     m])
                prev = os.path.basename(m)

        cases = [("qbm", None, t_qbm), ("convert", prep_convert, t_convert),
                 ("commit", prep_commit, t_commit), ("limit", None, t_limit),
                 ("consolidate", prep_consolidate, t_consolidate)]
        times = {c[0]: [] for c in cases}
        for rep in range(args.reps):
            for name, prep, fn in cases:
                if os.path.exists(out):
                    os.unlink(out)
                if prep:
                    prep()
                times[name].append(timed(fn))
            print("rep %d: %s" % (rep + 1, ", ".join(
                "%s %.2fs" % (n, times[n][-1]) for n, _, _ in cases)),
                flush=True)
        med = {n: statistics.median(v) for n, v in times.items()}
        rss = {"qbm": peak_rss([qbm, "restore", "-o", out, full] + incs)}
        prep_convert()
        t_convert_prev = os.path.join(d, "c%d.qcow2" % (len(incs) - 1))
        t_convert()
        rss["convert"] = peak_rss(["qemu-img", "convert", "-W", "-m", "16",
                                   "-O", "raw", t_convert_prev, out])
        print()
        print("%-11s %10s %10s %12s" % ("case", "median s", "vs qbm",
                                        "peak RSS"))
        for n in med:
            print("%-11s %10.2f %9.2fx %10s" % (
                n, med[n], med[n] / med["qbm"],
                "%.0f MiB" % rss[n] if n in rss else "-"))
        best = min(med["convert"], med["commit"])
        ok1 = best / med["qbm"] >= 1.5
        ok2 = med["qbm"] / med["limit"] <= 1.3
        print()
        print("qbm vs best qemu-img path: %.2fx (target >= 1.5x): %s" %
              (best / med["qbm"], "PASS" if ok1 else "FAIL"))
        print("qbm vs copy_file_range limit: %.2fx (target <= 1.3x): %s" %
              (med["qbm"] / med["limit"], "PASS" if ok2 else "FAIL"))
        print("in place: qemu-img commit / qbm consolidate: %.2fx" %
              (med["commit"] / med["consolidate"]))
        return 0 if ok1 and ok2 else 1
    finally:
        if args.keep:
            print("kept %s" % d)
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
