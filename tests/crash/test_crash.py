#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Crash-safety proof for every editing operation.

For each scenario, crash-harness applies one edit through the fault
injecting I/O backend with a simulated crash at every write and flush point
(and several seeds for which unflushed writes survive, torn or not). QEMU
judges every resulting image: `qemu-img check` must find no corruption
(leaked clusters are allowed), `qemu-img info` must list either the bitmaps
from before the edit or those after it, and the contents of every bitmap
(read with qbm dump, which the other suites check against qemu-nbd) must be
exactly the before or the after state. The uncrashed result is also
checked against QEMU's own view with qemu-nbd + nbdinfo.
A crash or an error on a vectored write (a batch of new clusters) cuts
it: a prefix of its sectors lands first; the scenarios named "batch"
must meet such a cut and are judged like every other point.
Errors that are not crashes (a full disk, a transient EIO): every write
and flush point of each bitmap edit fails once in turn (crash-harness
--fail, ENOSPC for every edit, EIO for a few), and the image the failed
commit leaves is judged by what the message says: "the image was not
changed" means the old bitmaps, the old size and a clean qemu-img check
(no leaks: the refcounts written are given back); "the edit is in place"
the new bitmaps; "the switch ... failed" either state; leaks are allowed
in the last two.
--seeds N caps the seeds of every scenario (valgrind runs 1: the seed only
picks which unflushed writes the crash image keeps; the library runs the
same code for every seed).
"""
import errno
import hashlib
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (Fail, Qcow2, Suite, dirty_map,  # noqa: E402
                     qemu_bitmaps, qemu_img, qemu_img_check, qemu_img_compare,
                     qemu_img_create, qemu_io, run, set_in_use)


def state(qbm, img):
    """The bitmaps of an image as qemu-img info lists them, and their
    contents as qbm dump reads them (both without taking locks)."""
    bm = qemu_bitmaps(img, force_share=True)
    return bm, {n: qbm.dump("-U", img, n) for n in sorted(bm)}


def make(tmp, name, size, opts, bitmaps, writes, backing=None):
    path = os.path.join(tmp, name)
    qemu_img_create(path, size, opts=opts, backing=backing)
    for b, gran, disabled in bitmaps:
        qemu_img(*(["bitmap", "--add", "-g", str(gran)] +
                   (["--disable"] if disabled else []) + [path, b]))
    if writes:
        qemu_io(path, *writes)
    return path


def reftable(path):
    q = Qcow2(path)
    return q.refcount_table_offset, q.refcount_table_clusters


def at_refcount_edge(tmp):
    """An image whose refcount table is nearly full, so that the clusters
    qbm allocates need a larger table: the largest single write (found by
    bisection on fresh images) after which QEMU has not grown it yet."""
    def build(nbytes):
        path = make(tmp, "edge.qcow2", 256 << 20,
                    "cluster_size=512,refcount_bits=64",
                    [("g0", 512, False)],
                    ["write 0 %d" % nbytes] if nbytes else [])
        return reftable(path)[1]
    first = build(0)
    lo, hi = 0, 64 << 20  # in bytes, multiples of 4 KiB
    while hi - lo > 4096:
        mid = (lo + hi) // 2 // 4096 * 4096
        if build(mid) == first:
            lo = mid
        else:
            hi = mid
    build(lo)
    return os.path.join(tmp, "edge.qcow2")


def content_scenarios(tmp):
    """Edits of guest data or of the backing pointer: judged by contents
    (qemu-img compare) and qemu-img check."""
    full = make(tmp, "full.qcow2", 32 << 20, None, [("f", 65536, False)],
                ["write -P 1 0 4M", "write -c -P 2 8M 1M"])
    inc1 = make(tmp, "inc1.qcow2", 32 << 20, "cluster_size=4096", [],
                ["write -P 3 1M 100k", "write -z 8M 512k"])
    inc2 = make(tmp, "inc2.qcow2", 32 << 20, None, [],
                ["write -P 4 3M 2M", "write -P 5 20M 64k"])
    lonely = make(tmp, "lonely.qcow2", 32 << 20, "cluster_size=512", [],
                  ["write -P 6 0 1M"])
    return [
        ("consolidate two incrementals", full, 2, "consolidate", inc1, inc2),
        ("set a backing file (adds the format extension)", lonely, 3,
         "backing", "back32.qcow2", "qcow2"),
    ]


def scenarios(tmp):
    """(description, image, seeds, operation...)"""
    base = make(tmp, "std.qcow2", 64 << 20, None,
                [("b0", 65536, False), ("b1", 131072, True)],
                ["write 0 64k", "write 1M 192k", "write 10M 512"])
    small = make(tmp, "small.qcow2", 24 << 20, "cluster_size=512",
                 [("s0", 512, False)],
                 ["write 0 20M", "write 22M 4k"])
    pair = make(tmp, "pair.qcow2", 24 << 20, "cluster_size=512",
                [("p0", 512, False), ("p1", 512, True)],
                ["write 0 3M", "write 9M 5k", "write 22M 4k"])
    empty = make(tmp, "empty.qcow2", 32 << 20, None, [], ["write 0 1M"])
    make(tmp, "back.qcow2", 8 << 20, "cluster_size=512", [], [])
    over = make(tmp, "over.qcow2", 8 << 20, "cluster_size=512", [],
                ["write 4k 4k"], backing="back.qcow2")
    # d0 has the first MiB of every 2 MiB, d1 the second: merging d1 into
    # d0 rewrites all 12 data clusters of d0 (512 B clusters) in one batch.
    dense = make(tmp, "dense.qcow2", 24 << 20, "cluster_size=512",
                 [("d0", 512, False), ("d1", 512, True)],
                 ["write %d 1M" % (m << 20) for m in range(0, 24, 2)])
    qemu_img("bitmap", "--disable", dense, "d0")
    qemu_img("bitmap", "--enable", dense, "d1")
    qemu_io(dense, *["write %d 1M" % (m << 20) for m in range(1, 24, 2)])
    extl2 = make(tmp, "extl2.qcow2", 100 << 20,
                 "extended_l2=on,refcount_bits=1",
                 [("x", 4096, False)], ["write 5000 3000", "write 50M 1M"])
    # A checkpoint left in use by a crash, rebuilt from the backups: a
    # full taken before the last writes, and an incremental of some.
    rb = make(tmp, "rb.qcow2", 32 << 20, "cluster_size=4096",
              [("ck", 65536, False), ("keep", 4096, True)],
              ["write -P 1 0 4M", "write -c -P 2 8M 64k"])
    rb_full = os.path.join(tmp, "rb-full.qcow2")
    qemu_img("convert", "-O", "qcow2", rb, rb_full)
    rb_inc = make(tmp, "rb-inc.qcow2", 32 << 20, None, [],
                  ["write -P 3 1M 64k"])
    qemu_io(rb, "write -P 3 1M 64k", "write -P 1 2M 64k",
            "write -z 8M 64k", "write -P 4 20M 100k")
    set_in_use(rb, "ck")
    return [
        ("rebuild an in-use bitmap from backups", rb, 3, "rebuild", "ck",
         "0", rb_full, rb_inc),
        ("add to an image with bitmaps", base, 3, "add", "new", "65536",
         "0"),
        ("add the first bitmap (creates the extension)", empty, 3, "add",
         "first", "4096", "0"),
        ("add next to a backing name in a 512 B header cluster", over, 3,
         "add", "b", "512", "1"),
        ("add, 512 B clusters", small, 2, "add", "fine", "512", "0"),
        ("mark dirty forcing refcount table growth", at_refcount_edge(tmp),
         2, "dirty", "g0", "0", str(256 << 20)),
        ("remove one bitmap", base, 3, "remove", "b1"),
        ("remove every bitmap (drops the extension)", base, 3, "remove",
         "b0", "b1"),
        ("clear", base, 3, "clear", "b0"),
        ("enable", base, 2, "enable", "b1"),
        ("disable", base, 2, "disable", "b0"),
        ("rename", base, 2, "rename", "b0", "renamed"),
        ("merge across granularities", base, 3, "merge", "b1", "b0"),
        ("merge into an empty bitmap (shares the data clusters)", pair, 3,
         "merge", "p1", "p0"),
        ("merge rewriting every data cluster (one batch)", dense, 3,
         "merge", "d0", "d1"),
        ("mark a range dirty", small, 2, "dirty", "s0", "22000000",
         "500000"),
        ("mark dirty, extended L2, 1-bit refcounts", extl2, 2, "dirty", "x",
         "0", "100000000"),
    ]


def run_harness(suite, harness, tmp, backing, desc, img, seeds, op,
                opts=()):
    """Run the harness (with its options opts) on img with its crash images
    going to a new directory, where backing (a file of tmp) is linked so
    that relative backing names resolve: the directory, the number of
    write and flush points and how many of the crashes or failures cut a
    batch (the harness's output), or None after reporting a failure."""
    out = tempfile.mkdtemp(dir=tmp)
    os.symlink(os.path.join(tmp, backing), os.path.join(out, backing))
    p = run([harness] + list(opts) + [img, out, str(seeds)] + op, ok=None)
    if p.returncode != 0:
        suite.fail("%s: harness: %s" % (desc, p.stderr.strip()))
        return None
    npoints, cuts = map(int, p.stdout.split())
    return out, npoints, cuts


def crash_images(out):
    """The crash images the harness left in out, in name order, each with
    qemu-img check's verdict: (name, path, the completed check)."""
    for f in sorted(os.listdir(out)):
        if f.startswith("crash-"):
            path = os.path.join(out, f)
            yield f, path, qemu_img_check(path, ok=None)


def check_failures(suite, qbm, harness, tmp, desc, img, op, err):
    """Fail each write/flush point of the edit once with err; judge the
    images left behind. Returns how many were judged."""
    label = "%s, %s" % (desc, errno.errorcode[err])
    ran = run_harness(suite, harness, tmp, "back.qcow2", label, img, 1, op,
                      opts=["--fail=%d" % err])
    if not ran:
        return 0
    out, npoints, cuts = ran
    before = state(qbm, img)
    after = state(qbm, os.path.join(out, "after.qcow2"))
    size = os.path.getsize(img)
    if "batch" in desc and not cuts:
        suite.fail("%s: no failure cut a batch" % label)
    n = 0
    for point in range(1, npoints + 1):
        path = os.path.join(out, "failed-%d.qcow2" % point)
        with open(os.path.join(out, "failed-%d.txt" % point)) as f:
            msg = f.read().strip()
        n += 1
        c = qemu_img_check(path, ok=None)
        try:
            got = state(qbm, path)
        except Fail as e:
            suite.fail("%s, point %d: %s" % (label, point, e))
            continue
        where = "%s, point %d (%s)" % (label, point, msg)
        if msg.endswith("the image was not changed"):
            if got != before or c.returncode != 0 or \
                    os.path.getsize(path) != size:
                suite.fail("%s: not the old state: check rc=%d, size %d "
                           "(was %d), bitmaps %s" % (
                               where, c.returncode, os.path.getsize(path),
                               size, got))
        elif msg.startswith("the edit is in place"):
            if got != after or c.returncode not in (0, 3):
                suite.fail("%s: not the new state: check rc=%d" %
                           (where, c.returncode))
        elif msg.startswith("the switch to the new state failed"):
            if got not in (before, after) or c.returncode not in (0, 3):
                suite.fail("%s: neither state: check rc=%d" %
                           (where, c.returncode))
        else:
            suite.fail("%s: the message does not say what state the image "
                       "is in" % where)
        os.unlink(path)
    print("ok: %s (%d points fail once, %d cut a batch)" % (label, n, cuts))
    return n


def main():
    suite = Suite("crash", __doc__)
    suite.parser.add_argument("--harness", required=True)
    suite.parser.add_argument("--seeds", type=int, metavar="N",
                              help="at most N seeds per scenario")
    args = suite.start(paths=["harness"])
    qbm = suite.qbm
    checked = 0
    with suite.tempdir() as tmp:
        make(tmp, "back32.qcow2", 32 << 20, None, [], ["write -P 9 0 32M"])
        for desc, img, seeds, *op in content_scenarios(tmp):
            seeds = min(seeds, args.seeds or seeds)
            ran = run_harness(suite, args.harness, tmp, "back32.qcow2", desc,
                              img, seeds, op)
            if not ran:
                continue
            out, npoints, cuts = ran
            after_img = os.path.join(out, "after.qcow2")
            if qemu_img_check(after_img, ok=None).returncode != 0:
                suite.fail("%s: after the edit, qemu-img check fails" % desc)
            for f, path, c in crash_images(out):
                checked += 1
                same = [qemu_img_compare(path, ref)
                        for ref in (img, after_img)]
                if c.returncode not in (0, 3) or not any(same):
                    suite.fail("%s, %s: check rc=%d, equals before/after: %s"
                               % (desc, f, c.returncode, same))
                os.unlink(path)
            print("ok: %s (%s write/flush points x %d seeds)" %
                  (desc, npoints, seeds))
        edits = scenarios(tmp)
        for desc, img, seeds, *op in edits:
            seeds = min(seeds, args.seeds or seeds)
            before = state(qbm, img)
            digest = hashlib.sha256(open(img, "rb").read()).hexdigest()
            ran = run_harness(suite, args.harness, tmp, "back.qcow2", desc,
                              img, seeds, op)
            if not ran:
                continue
            out, npoints, cuts = ran
            if hashlib.sha256(open(img, "rb").read()).hexdigest() != digest:
                suite.fail("%s: the input image changed" % desc)
            after_img = os.path.join(out, "after.qcow2")
            c = qemu_img_check(after_img, ok=None)
            if c.returncode != 0:
                suite.fail("%s: after the edit, qemu-img check rc=%d: %s" %
                           (desc, c.returncode, c.stdout + c.stderr))
                continue
            after = state(qbm, after_img)
            for name, ext in after[1].items():
                if dirty_map(after_img, name) != ext:
                    suite.fail("%s: QEMU reads bitmap %s differently after "
                               "the edit" % (desc, name))
            if after == before:
                suite.fail("%s: the edit changed nothing" % desc)
            if "growth" in desc and reftable(after_img) == reftable(img):
                suite.fail("%s: the refcount table did not grow" % desc)
            if "batch" in desc and not cuts:
                suite.fail("%s: no crash cut a batch" % desc)
            for f, path, c in crash_images(out):
                checked += 1
                if c.returncode not in (0, 3):
                    suite.fail("%s, %s: qemu-img check rc=%d:\n%s" %
                               (desc, f, c.returncode, c.stdout + c.stderr))
                    continue
                try:
                    got = state(qbm, path)
                except Fail as e:
                    suite.fail("%s, %s: %s" % (desc, f, e))
                    continue
                if got != before and got != after:
                    suite.fail("%s, %s: bitmaps are neither the old nor the "
                               "new state:\n before %s\n after  %s\n got "
                               "   %s" % (desc, f, before, after, got))
                os.unlink(path)
            print("ok: %s (%d write/flush points x %d seeds, %d crashes "
                  "cut a batch)" % (desc, npoints, seeds, cuts))
        for k, (desc, img, seeds, *op) in enumerate(edits):
            for err in (errno.ENOSPC, errno.EIO) if k < 3 else (
                    errno.ENOSPC,):
                checked += check_failures(suite, qbm, args.harness, tmp,
                                          desc, img, op, err)
    print("crash images checked: %d" % checked)
    # Every crash image is one case; the other failures count against them.
    suite.passed = checked - suite.failed
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
