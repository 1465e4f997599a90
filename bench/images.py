# SPDX-License-Identifier: LGPL-2.1-or-later
"""Image builders shared by the benchmarks (sparse files; 16 TiB is cheap)."""
import os
import struct
import subprocess
import time

TiB = 1 << 40


def run(cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


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
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)])
    run(["qemu-img", "bitmap", "--add", "-g", "64K", path, "base"])
    if alt:
        run(["qemu-img", "bitmap", "--add", "-g", "64K", path, "alt"])
        fill_bitmap(path, "alt", 160)
    fill_bitmap(path, "base", 0)
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


