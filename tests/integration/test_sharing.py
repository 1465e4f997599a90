#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Bitmap data clusters shared between bitmaps, judged by QEMU.

A merge (or a rewrite) that leaves a data cluster unchanged does not copy
it: the new table points at the existing cluster and its refcount goes up.
This test pins that down and lets QEMU judge every step:
- merging into an empty bitmap of the same image shares every data
  cluster (the tables hold the same offsets); with refcount_bits=1 nothing
  can be shared and the clusters are copied;
- a merge from another image (-b) copies;
- `qemu-img check` is clean after each step, QEMU exports exactly the
  expected extents, and QEMU's own rewrite (qemu-io writes with both
  bitmaps enabled), `qemu-img bitmap --remove` of one sharer and `qbm clear`
  of the other leave the survivor intact and the refcounts right.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (OFFSET_MASK, Fail, Qcow2, Suite,  # noqa: E402
                     dirty_map, qemu_img, qemu_img_check,
                     qemu_img_create, qemu_io)


def tables(img):
    """{bitmap name: [data cluster offsets]} read straight from the file."""
    q = Qcow2(img)
    return {e.name: [x & OFFSET_MASK for x in q.bitmap_table(e)]
            for e in q.bitmaps}


def check(img):
    qemu_img_check(img, "-q")


def make(tmp, name, refcount_bits=16):
    """64 MiB, 4 KiB clusters, bitmap 'a' (512 B granularity: four data
    clusters) dirty in several places."""
    img = os.path.join(tmp, name)
    qemu_img_create(img, "64M", opts="cluster_size=4096,refcount_bits=%d" %
                    refcount_bits)
    qemu_img("bitmap", "--add", "-g", "512", img, "a")
    qemu_io(img, "write 0 4k", "write 20M 1k", "write 40M 512",
            "write 63M 1M")
    return img


def scenario_same_image(qbm, tmp):
    img = make(tmp, "s.qcow2")
    want = dirty_map(img, "a")
    qbm("add", "-g", "512", img, "t")
    qbm("merge", img, "t", "a")
    check(img)
    t = tables(img)
    data_a = [o for o in t["a"] if o]
    if len(data_a) < 3 or t["t"] != t["a"]:
        raise Fail("merge into an empty bitmap did not share the clusters: "
                   "a=%s t=%s" % (t["a"], t["t"]))
    if dirty_map(img, "t") != want or dirty_map(img, "a") != want:
        raise Fail("shared bitmaps read back wrong")
    # QEMU rewrites both enabled bitmaps on close, freeing the shared
    # clusters once per bitmap.
    qemu_io(img, "write 30M 4k")
    check(img)
    want2 = sorted(want + [(30 << 20, 4096)])
    if dirty_map(img, "t") != want2 or dirty_map(img, "a") != want2:
        raise Fail("after QEMU's rewrite: %s" % dirty_map(img, "t"))
    # Share again; QEMU removes one sharer, qbm clears the other.
    qbm("remove", img, "t")
    qbm("add", "-g", "512", img, "t")
    qbm("merge", img, "t", "a")
    qemu_img("bitmap", "--remove", img, "a")
    check(img)
    if dirty_map(img, "t") != want2:
        raise Fail("removing one sharer changed the other")
    qbm("add", "-g", "512", img, "a")
    qbm("merge", img, "a", "t")
    qbm("clear", img, "t")
    check(img)
    if dirty_map(img, "a") != want2 or dirty_map(img, "t") != []:
        raise Fail("clearing one sharer changed the other")
    # A rewrite of a bitmap that changes one chunk keeps the others.
    before = [o for o in tables(img)["a"] if o]
    qbm("merge", img, "a", "t")  # t is empty: nothing changes
    qemu_io(img, "write 0 4k")
    qbm("populate", img, "a")
    check(img)
    after = tables(img)["a"]
    kept = [o for o in before if o in after]
    if len(kept) < len(before) - 1:
        raise Fail("populate rewrote unchanged clusters: %s -> %s" %
                   (before, after))
    out = qbm("check", img).stdout
    if "No problems" not in out:
        raise Fail("qbm check: %s" % out)


def scenario_no_share(qbm, tmp):
    img = make(tmp, "r1.qcow2", refcount_bits=1)
    want = dirty_map(img, "a")
    qbm("add", "-g", "512", img, "t")
    qbm("merge", img, "t", "a")
    check(img)
    t = tables(img)
    shared = set(o for o in t["a"] if o) & set(o for o in t["t"] if o)
    if shared:
        raise Fail("refcount_bits=1 cannot share, but %s are" % shared)
    if dirty_map(img, "t") != want:
        raise Fail("copied bitmap reads back wrong")


def scenario_other_image(qbm, tmp):
    src = make(tmp, "src.qcow2")
    img = os.path.join(tmp, "dst.qcow2")
    qemu_img_create(img, "64M", opts="cluster_size=4096")
    qbm("add", "-g", "512", img, "t")
    qbm("merge", "-b", src, img, "t", "a")
    check(img)
    check(src)
    if dirty_map(img, "t") != dirty_map(src, "a"):
        raise Fail("merge -b reads back wrong")
    qbm("copy", src, img)
    check(img)
    if dirty_map(img, "a") != dirty_map(src, "a"):
        raise Fail("copy reads back wrong")


def main():
    suite = Suite("sharing", __doc__)
    suite.start()
    for fn in (scenario_same_image, scenario_no_share, scenario_other_image):
        suite.case(fn.__name__, lambda tmp: fn(suite.qbm, tmp))
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
