#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Hostile-image catalogue: malformed images against every command.

Each entry patches bytes of a qemu-img image (two bitmaps with data, a
second one with an L2 table) to break one structure. Every command runs on
it under a timeout; requirements: no crash (exit < 128, no sanitizer
report), no hang, a failure is exit 1 with `qbm: ...` on stderr and
nothing on stdout (check may report problems with exit 2 or 3), a refused
edit leaves the file byte for byte unchanged, and `qbm check` finds every
malformation (non-zero exit). Entries that name an offset (the broken
refcount structures) go further: every edit must refuse with a message
naming 'refcount', that offset and 'qemu-img check', `qbm check` must
report corruption (exit 2), and info and dump must still work. Also: while qemu-nbd holds the image (read-
write or read-only) every edit fails with a lock message and changes
nothing, and a process holding qbm's writer lock bytes, or libqbm with the
image open for writing, makes qemu-img and qemu-io fail.
For slow runs (valgrind), --every N runs every image with 1/N of the
commands, and --shard K/N is one of N parts of a run, for N processes.
"""
import ctypes
import fcntl
import hashlib
import os
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
import qbmtest  # noqa: E402
from qbmtest import OFFSET_MASK, Qcow2, Suite, Timeout, patch  # noqa: E402


def run(cmd, timeout=30):
    """A command whose exit the caller judges; Timeout after 30 s."""
    return qbmtest.run(cmd, ok=None, timeout=timeout)


class Layout:
    """Offsets of the structures in the base image."""

    def __init__(self, data):
        q = Qcow2(data)
        self.cs = q.cluster_size
        self.l1 = q.l1_table_offset
        self.rt = q.refcount_table_offset
        self.end = q.extensions_end
        self.bm_ext = q.bitmaps_ext.data
        self.dir = q.bitmap_directory_offset
        self.dir_size = q.bitmap_directory_size
        self.entry2 = q.bitmaps[1].offset
        self.table = q.bitmaps[0].bitmap_table_offset
        self.data0 = q.bitmap_table(q.bitmaps[0])[0] & OFFSET_MASK
        self.l2 = q.l1_table()[0] & OFFSET_MASK
        self.rb = q.refcount_table()[0] & ~0x1ff
        self.size = len(data)
        self.nb_snapshots = q.nb_snapshots
        self.snapshots = q.snapshots_offset
        if self.nb_snapshots:
            self.snap_l1 = struct.unpack(">Q", q.read(self.snapshots, 8))[0]
            # The write at 0 after the snapshot copied the L2 table: the
            # old one is the snapshot's alone.
            self.snap_l2 = struct.unpack(">Q", q.read(self.snap_l1, 8))[0] \
                & OFFSET_MASK
            assert self.snap_l2 and self.snap_l2 != self.l2


def catalogue(lay):
    """(name, patch function, offset an edit's refusal must name or None)
    triples; each gets a fresh copy."""
    L = lay
    c = []

    def p(name, off, fmt, value, refuse=None):
        c.append((name, lambda d: patch(d, off, fmt, value), refuse))

    c.append(("truncated to 50 bytes", lambda d: d.__delitem__(
        slice(50, None)), None))
    c.append(("truncated inside the L1 table", lambda d: d.__delitem__(
        slice(L.l1 + 4, None)), None))
    p("bad magic", 0, ">I", 0x514649fa)
    p("version 1", 4, ">I", 1)
    p("version 4", 4, ">I", 4)
    p("cluster_bits 8", 20, ">I", 8)
    p("cluster_bits 22", 20, ">I", 22)
    p("header_length 100", 100, ">I", 100)
    p("header_length unaligned", 100, ">I", 117)
    p("header_length past the cluster", 100, ">I", L.cs + 8)
    p("unknown incompatible bit 20", 72, ">Q", 1 << 20)
    p("compression bit without a type", 72, ">Q", 8)
    p("corrupt bit", 72, ">Q", 2)
    p("dirty bit", 72, ">Q", 1)
    p("refcount_order 7", 96, ">I", 7)
    p("crypt_method 5", 32, ">I", 5)
    p("backing name offset past the cluster", 8, ">Q", L.cs + 512)
    c.append(("backing name of 2000 bytes", lambda d: (
        patch(d, 8, ">Q", L.end + 8), patch(d, 16, ">I", 2000)), None))
    p("L1 too small for the disk", 36, ">I", 0)
    p("L1 offset unaligned", 40, ">Q", L.l1 + 8)
    p("L1 of 5 million entries", 36, ">I", 5 << 20)
    p("L1 offset past 2^56", 40, ">Q", 1 << 57)
    p("refcount table offset unaligned", 48, ">Q", L.rt + 16)
    p("refcount table of 0 clusters", 56, ">I", 0)
    p("refcount table of 200000 clusters", 56, ">I", 200000)
    p("70000 snapshots", 60, ">I", 70000)
    c.append(("snapshot table unaligned", lambda d: (
        patch(d, 60, ">I", 1), patch(d, 64, ">Q", 0x10008)), None))
    p("virtual size 2^62", 24, ">Q", 1 << 62)
    c.append(("extension overrunning the cluster", lambda d: patch(
        d, L.end + 4, ">I", L.cs) if patch(d, L.end, ">I", 0x11111111) is None
        else None, None))
    p("bitmaps extension length 23", L.bm_ext - 4, ">I", 23)
    p("bitmaps extension reserved field", L.bm_ext + 4, ">I", 1)
    p("nb_bitmaps 0", L.bm_ext, ">I", 0)
    p("nb_bitmaps one too many", L.bm_ext, ">I", 3)
    p("nb_bitmaps 70000", L.bm_ext, ">I", 70000)
    p("directory offset unaligned", L.bm_ext + 16, ">Q", L.dir + 8)
    p("directory offset past 2^56", L.bm_ext + 16, ">Q", 1 << 57)
    p("directory size 0", L.bm_ext + 8, ">Q", 0)
    p("directory size 2^40", L.bm_ext + 8, ">Q", 1 << 40)
    p("directory size cuts an entry", L.bm_ext + 8, ">Q", L.dir_size - 8)
    p("entry flag bit 2", L.dir + 12, ">I", 6)
    p("entry reserved flag bit 9", L.dir + 12, ">I", (1 << 9) | 2)
    p("entry type 2", L.dir + 16, ">B", 2)
    p("entry granularity bits 8", L.dir + 17, ">B", 8)
    p("entry granularity bits 40", L.dir + 17, ">B", 40)
    p("entry name size 2000", L.dir + 18, ">H", 2000)
    p("entry extra data size 8", L.dir + 20, ">I", 8)
    p("entry table offset unaligned", L.dir, ">Q", L.table + 8)
    p("entry table offset 0", L.dir, ">Q", 0)
    p("entry table size 0", L.dir + 8, ">I", 0)
    p("entry table size wrong", L.dir + 8, ">I", 2)
    p("entry table size huge", L.dir + 8, ">I", 0x9000000)
    c.append(("duplicate bitmap names", lambda d: d.__setitem__(
        slice(L.entry2 + 24, L.entry2 + 26), b"b0"), None))
    p("table entry reserved bits", L.table, ">Q", L.data0 | 2)
    p("table entry all-ones with an offset", L.table, ">Q", L.data0 | 1)
    p("table entry unaligned", L.table, ">Q", L.data0 + 512)
    p("table entry past 2^56", L.table, ">Q", 1 << 57)
    p("refcount table entry unaligned", L.rt, ">Q", L.rb + 8)
    c.append(("refcount block claiming everything", lambda d: d.__setitem__(
        slice(L.rb, L.rb + L.cs), b"\xff" * L.cs), None))
    p("refcount of the header 0", L.rb, ">H", 0)
    p("L1 entry unaligned", L.l1, ">Q", (L.l2 + 8) | (1 << 63))
    p("L2 entry reserved bits", L.l2, ">Q", (1 << 63) | 0x10002)
    p("L2 entry unaligned data offset", L.l2, ">Q", (1 << 63) | 0x10200)
    p("autoclear bitmaps bit cleared (stale)", 88, ">Q", 0)
    c.append(("backing file is itself", lambda d: (
        d.__setitem__(slice(L.end + 8, L.end + 8 + 7), b"h.qcow2"),
        patch(d, 8, ">Q", L.end + 8), patch(d, 16, ">I", 7)), None))
    refcount_cases(L, p)
    return c


def refcount_cases(L, p):
    """Broken refcount table entries: edits must refuse before writing a
    refcount block there. Entry 5 is one the image does not use yet (it
    covers clusters from 5 * 2 GiB on), so only a check of the whole table
    finds it; entry 0 is the live one."""
    e0, e5 = L.rt, L.rt + 5 * 8
    h = "0x%x" % e5
    p("refcount table entry 0 past the end (live)", e0, ">Q", 0xff000000,
      "0x%x" % e0)
    p("refcount table entry 0 unaligned (live)", e0, ">Q", L.rb + 512,
      "0x%x" % e0)
    p("refcount table entry reserved bits (unused entry)", e5, ">Q", 0x1ff,
      h)
    p("refcount table entry 1 TiB past the end (unused entry)", e5, ">Q",
      1 << 40, h)
    p("refcount table entry just past the end (unused entry)", e5, ">Q",
      (L.size + L.cs - 1) // L.cs * L.cs, h)
    p("refcount table entry unaligned (unused entry)", e5, ">Q",
      L.rb + 512, h)
    p("refcount block inside the header cluster", e5, ">Q", 512, h)
    p("refcount block over the L1 table", e5, ">Q", L.l1, h)
    p("refcount block over an L2 table", e5, ">Q", L.l2, h)
    p("refcount block over the refcount table", e5, ">Q", L.rt, h)
    p("refcount block shared by two entries", e5, ">Q", L.rb, h)
    p("refcount block over the bitmap directory", e5, ">Q", L.dir, h)
    p("refcount block over a bitmap table", e5, ">Q", L.table, h)
    p("refcount block over bitmap data", e5, ">Q", L.data0, h)
    if L.nb_snapshots:
        p("refcount block over the snapshot table", e5, ">Q", L.snapshots,
          h)
        p("refcount block over a snapshot L1 table", e5, ">Q", L.snap_l1,
          h)
        # Not a refcount structure, but the first free cluster an edit
        # would allocate: refused as corrupt, never overwritten.
        p("snapshot-only L2 table with refcount 0",
          L.rb + L.snap_l2 // L.cs * 2, ">H", 0, "0x%x" % L.snap_l2)


def snapshot_catalogue(lay):
    """Cases that need an image with an internal snapshot."""
    c = []

    def p(name, off, fmt, value, refuse=None):
        if "snapshot" in name:
            c.append((name, lambda d: patch(d, off, fmt, value), refuse))
    refcount_cases(lay, p)
    return c


COMMANDS = [
    ("info", ["info"], False),
    ("add -g 16k", ["add", "-g", "16k", "@", "f5"], True), ("info --chain", ["info", "--chain"], False),
    ("info json", ["info", "--output=json"], False),
    ("dump", ["dump", "@", "b0"], False),
    ("dump --chain", ["dump", "--chain", "@", "b0"], False),
    ("check", ["check"], False), ("check --chain", ["check", "--chain"],
                                  False),
    ("add", ["add", "@", "new"], True), ("remove", ["remove", "@", "b0"],
                                        True),
    ("clear", ["clear", "@", "b0"], True),
    ("enable", ["enable", "@", "b1"], True),
    ("rename", ["rename", "@", "b0", "z"], True),
    ("merge", ["merge", "@", "b0", "b1"], True),
    ("populate", ["populate", "@", "b0"], True),
    ("check --repair", ["check", "--repair"], True),
    ("extract", ["extract", "-o", "OUT", "@", "b0"], False),
    ("restore", ["restore", "-o", "OUT", "@"], False),
]


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def command_line(qbm, args, img, out):
    a = [out if x == "OUT" else img if x == "@" else x for x in args]
    if "@" not in args:
        a.append(img)
    return [qbm] + a


def base_image(path, snapshot=False):
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"])
    if snapshot:
        run(["qemu-io", "-f", "qcow2", "-c", "write 8M 64k", path])
        run(["qemu-img", "snapshot", "-c", "s1", path])
    run(["qemu-img", "bitmap", "--add", path, "b0"])
    run(["qemu-img", "bitmap", "--add", "-g", "128k", path, "b1"])
    run(["qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c",
         "write 1M 192k", path])
    return bytearray(open(path, "rb").read())


def hostile(qbm, tmp, every=1, shard=(0, 1)):
    orig = base_image(os.path.join(tmp, "base.qcow2"))
    snap = base_image(os.path.join(tmp, "snap.qcow2"), snapshot=True)
    entries = [(orig,) + e for e in catalogue(Layout(orig))]
    entries += [(snap,) + e for e in snapshot_catalogue(Layout(snap))]
    img = os.path.join(tmp, "h.qcow2")
    out = os.path.join(tmp, "out.img")
    # Every Nth (image, command) pair: image i gets the commands j with
    # (i + j) % every == 0, so every image is still run, and with every
    # up to 6 (or 8) each one meets a read-only command and an edit. The
    # pairs are dealt to the shards in turn.
    pairs = [(i, j) for i in range(len(entries))
             for j in range(len(COMMANDS)) if (i + j) % every == 0]
    pairs = pairs[shard[0]::shard[1]]
    failures = 0
    for i, (base, name, fn, refuse) in enumerate(entries):
        commands = [COMMANDS[j] for k, j in pairs if k == i]
        if not commands:
            continue
        data = bytearray(base)
        fn(data)
        for cname, args, edits in commands:
            with open(img, "wb") as f:
                f.write(data)
            before = sha(img)
            cmd = command_line(qbm, args, img, out)
            try:
                p = run(cmd, timeout=30)
            except Timeout:
                print("FAIL %s / %s: hung" % (name, cname))
                failures += 1
                continue
            bad = []
            if p.returncode < 0 or p.returncode >= 128:
                bad.append("crashed (%d)" % p.returncode)
            if "Sanitizer" in p.stderr or "runtime error" in p.stderr:
                bad.append("sanitizer report")
            if p.returncode == 1 and (not p.stderr.startswith("qbm: ") or
                                      p.stdout):
                bad.append("unclear failure")
            if p.returncode not in (0, 1, 2, 3):
                bad.append("exit %d" % p.returncode)
            if edits and p.returncode != 0 and sha(img) != before:
                bad.append("a refused edit changed the file")
            if cname == "check" and p.returncode == 0:
                bad.append("check finds nothing wrong")
            if refuse:
                bad += refused_as_corrupt(cname, edits, p, refuse)
            if os.path.exists(out) and p.returncode != 0:
                bad.append("a failed command left its output")
            if bad:
                failures += 1
                print("FAIL %s / %s: %s\n  stderr: %s" %
                      (name, cname, ", ".join(bad), p.stderr[:300]))
            if os.path.exists(out):
                os.unlink(out)
    print("hostile images: %d, commands: %d, runs: %d" % (
        len({i for i, j in pairs}), len({j for i, j in pairs}), len(pairs)))
    return len(pairs) - failures, failures


def refused_as_corrupt(cname, edits, p, offset):
    """What an image with a broken refcount structure must get."""
    if cname == "check":
        return [] if p.returncode == 2 else ["check exit %d, not 2 "
                                             "(corruption)" % p.returncode]
    if cname in ("info", "dump"):
        return [] if p.returncode == 0 else ["a read-only command failed"]
    if not edits:
        return []
    if p.returncode == 0:
        return ["the edit was accepted"]
    if cname == "check --repair":
        return []
    missing = [w for w in ("refcount", offset, "qemu-img check")
               if w not in p.stderr]
    return ["the refusal does not name %s" % ", ".join(missing)] if missing \
        else []


def locks(qbm, tmp, libqbm=None):
    img = os.path.join(tmp, "locked.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"])
    run(["qemu-img", "bitmap", "--add", img, "b0"])
    passed = failed = 0
    for ro in (False, True):
        sock = os.path.join(tmp, "nbd.sock")
        nbd = subprocess.Popen(["qemu-nbd", "-t", "-k", sock, "-f", "qcow2"] +
                               (["-r"] if ro else []) + [img],
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        # The socket appears before qemu-nbd is done opening the image
        # (a read-write open marks the bitmaps in use): wait until an NBD
        # client is served, and take each checksum right before qbm runs.
        uri = "nbd+unix:///?socket=" + sock
        for _ in range(200):
            if os.path.exists(sock) and subprocess.run(
                    ["nbdinfo", "--size", uri], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL).returncode == 0:
                break
            time.sleep(0.05)
        try:
            for cname, args, edits in COMMANDS:
                if not edits:
                    continue
                before = sha(img)
                p = run(command_line(qbm, args, img, ""))
                if p.returncode == 1 and "lock" in p.stderr and \
                        sha(img) == before:
                    passed += 1
                else:
                    failed += 1
                    print("FAIL qemu-nbd%s holds the image, %s: exit %d, %s"
                          % (" -r" if ro else "", cname, p.returncode,
                             p.stderr.strip()))
            p = run([qbm, "info", img])
            if (p.returncode == 0) == ro:
                passed += 1
            else:
                failed += 1
                print("FAIL qbm info while qemu-nbd%s holds: exit %d" %
                      (" -r" if ro else "", p.returncode))
        finally:
            nbd.terminate()
            nbd.wait()
            if os.path.exists(sock):
                os.unlink(sock)
    # The lock bytes qbm takes for writing keep QEMU out.
    fd = os.open(img, os.O_RDWR)
    try:
        for byte in (100, 101, 103, 201, 203):
            fcntl.fcntl(fd, 37, struct.pack("hhqqi", fcntl.F_RDLCK, 0, byte,
                                            1, 0))  # F_OFD_SETLK
        p2, f2 = qemu_kept_out(img, "qbm's writer lock bytes are held")
        passed += p2
        failed += f2
    finally:
        os.close(fd)
    # And the library itself holding the image open for writing.
    if libqbm:
        lib = ctypes.CDLL(libqbm)
        lib.qbm_open.restype = ctypes.c_void_p
        lib.qbm_open.argtypes = [ctypes.c_char_p, ctypes.c_uint]
        lib.qbm_close.argtypes = [ctypes.c_void_p]
        h = lib.qbm_open(img.encode(), 1)  # QBM_OPEN_RDWR
        if not h:
            failed += 1
            print("FAIL qbm_open for writing")
        else:
            try:
                p2, f2 = qemu_kept_out(img, "libqbm has the image open for "
                                       "writing")
                passed += p2
                failed += f2
            finally:
                lib.qbm_close(h)
        p = run(["qemu-io", "-c", "write 0 512", img])
        if p.returncode == 0:
            passed += 1
        else:
            failed += 1
            print("FAIL qemu-io after qbm_close: %s" % p.stderr.strip())
    return passed, failed


def qemu_kept_out(img, why):
    passed = failed = 0
    for cmd in (["qemu-img", "info", img],
                ["qemu-io", "-c", "write 0 512", img]):
        p = run(cmd)
        if p.returncode != 0 and "lock" in p.stderr:
            passed += 1
        else:
            failed += 1
            print("FAIL %s while %s: exit %d" % (cmd[0], why, p.returncode))
    return passed, failed


def main():
    suite = Suite("hostile", __doc__, tools=["qemu-img", "qemu-io",
                                             "qemu-nbd"])
    suite.parser.add_argument("--libqbm",
                              help="libqbm.so, to hold an image open")
    suite.parser.add_argument("--every", type=int, default=1,
                              help="only every Nth (image, command) pair: "
                              "every image, 1/N of the commands each "
                              "(slow runs)")
    suite.parser.add_argument("--shard", default="0/1", metavar="K/N",
                              help="only the Kth of N equal parts "
                              "(counting from 0; the lock checks go with "
                              "part 0)")
    args = suite.start(paths=["libqbm"])
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        suite.parser.error("--shard: K/N with 0 <= K < N")
    p2 = f2 = 0
    with suite.tempdir() as tmp:
        p1, f1 = hostile(args.qbm, tmp, args.every, shard)
        if shard[0] == 0:
            p2, f2 = locks(args.qbm, tmp, args.libqbm)
    suite.passed, suite.failed = p1 + p2, f1 + f2
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
