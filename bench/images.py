# SPDX-License-Identifier: LGPL-2.1-or-later
"""Image builders shared by the benchmarks (sparse files; 16 TiB is cheap),
on the test suites' qbmtest module."""
import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "tests"))
import qbmtest  # noqa: E402
from qbmtest import (Qcow2, qemu_img, qemu_img_check,  # noqa: E402
                     qemu_img_create, qemu_io)

TiB = qbmtest.TiB


def parser(doc, reps, bitmaps=False):
    """An argument parser (described by the first line of doc) with the
    options every benchmark takes: --qbm (default: the build tree's),
    --reps, --dir for the images (QBM_BENCH_DIR, else /var/tmp), and with
    bitmaps, --bitmaps for the image with many."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--qbm", default=os.path.join(here, "..", "build",
                                                  "tools", "qbm"))
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--dir", default=os.environ.get("QBM_BENCH_DIR",
                                                    "/var/tmp"))
    if bitmaps:
        ap.add_argument("--bitmaps", type=int, default=1000)
    return ap


def work_dir(args, name):
    """A new directory under args.dir for the images of benchmark name
    (the caller removes it)."""
    d = tempfile.mkdtemp(prefix="qbm-bench-%s-" % name, dir=args.dir)
    print("building images in %s ..." % d, flush=True)
    return d


def run(cmd):
    """Run cmd for its effect (stdout discarded, stderr shown); a failure
    raises qbmtest.Fail."""
    return qbmtest.run(cmd, quiet=True)


def rss(cmd):
    """Peak resident set size of a command in MiB (/usr/bin/time -v)."""
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    for line in p.stderr.splitlines():
        if "Maximum resident set size" in line:
            return int(line.split(":")[1]) / 1024
    return float("nan")


def timed(cmd):
    t = time.perf_counter()
    run(cmd)
    return time.perf_counter() - t


def bitmap_table(img, name):
    """(table offset, table size, cluster size) of bitmap `name`."""
    q = Qcow2(img)
    e = q.bitmap(name)
    return e.bitmap_table_offset, e.bitmap_table_size, q.cluster_size


def data_clusters(img, name):
    """(host offsets of the data clusters of bitmap `name`, cluster size)."""
    toff, tsize, cs = bitmap_table(img, name)
    with open(img, "rb") as f:
        f.seek(toff)
        raw = f.read(tsize * 8)
    offs = [e & 0x00fffffffffffe00 for e in struct.unpack(">%dQ" % tsize, raw)]
    return [o for o in offs if o], cs


def fill_bitmap(path, name, first):
    """Give every data cluster of bitmap `name` one 0xff byte every 320
    bytes from byte `first` on (~200 extents of 512 KiB per cluster)."""
    toff, tsize, cs = bitmap_table(path, name)
    chunk = bytearray(cs)
    for i in range(first, cs, 320):
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


def make_dense(path, size, alt=False):
    """Bitmap 'base' with all data clusters non-empty; with alt, also
    bitmap 'alt' whose bits are disjoint from base's, so that merging it
    into a copy of base changes every data cluster."""
    qemu_img_create(path, size)
    qemu_img("bitmap", "--add", "-g", "64K", path, "base")
    if alt:
        qemu_img("bitmap", "--add", "-g", "64K", path, "alt")
        fill_bitmap(path, "alt", 160)
    fill_bitmap(path, "base", 0)
    # The new clusters have no refcount yet: QEMU's repair adds them.
    qemu_img_check(path, "-q", "-r", "all", ok=None)
    qemu_img_check(path, "-q")


def make_sparse(path, size):
    qemu_img_create(path, size)
    qemu_img("bitmap", "--add", "-g", "64K", path, "base")
    qemu_io(path, "write 1G 64k", "write %d 1M" % (size // 5),
            "write %d 4k" % (size - 65536))


def make_many(qbm, path, size, n):
    qemu_img_create(path, size)
    for i in range(n):
        run([qbm, "add", path, "b%04d" % i])
        if i % 100 == 0:
            qemu_io(path, "write %d 1M" % (i << 30))
    qemu_img("bitmap", "--add", path, "base")


def resident_pages(path):
    """Pages of `path` in the page cache (fincore), None without fincore."""
    if not shutil.which("fincore"):
        return None
    p = subprocess.run(["fincore", "--raw", "--noheadings", "--output",
                        "PAGES", path], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, check=True)
    return int(p.stdout.split()[0])


def evict(paths, tries=10):
    """Write back and drop the cached pages of every path, again while
    fincore still finds some (pages under writeback are not dropped), up
    to `tries` times; the pages left, summed (0 expected), or None without
    fincore."""
    left = None
    for path in paths:
        for _ in range(tries):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n = resident_pages(path)
            if not n:
                break
        if n is not None:
            left = (left or 0) + n
    return left
