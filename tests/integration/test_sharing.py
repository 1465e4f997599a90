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
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

TOOLS = ["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"]


class Fail(Exception):
    pass


def run(cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    if p.returncode != 0:
        raise Fail("%s -> %d\n%s%s" % (" ".join(cmd), p.returncode, p.stdout,
                                       p.stderr))
    return p.stdout


def tables(img):
    """{bitmap name: [data cluster offsets]} read straight from the file."""
    with open(img, "rb") as f:
        data = f.read()
    cs = 1 << struct.unpack(">I", data[20:24])[0]
    pos = struct.unpack(">I", data[100:104])[0]
    while True:
        magic, length = struct.unpack(">II", data[pos:pos + 8])
        if magic == 0:
            return {}
        if magic == 0x23852875:
            _, _, dsize, doff = struct.unpack(">IIQQ", data[pos + 8:pos + 32])
            break
        pos += 8 + (length + 7) // 8 * 8
    out, p = {}, doff
    while p < doff + dsize:
        toff, tsize, _, _, _, nsz, esz = struct.unpack(">QIIBBHI",
                                                       data[p:p + 24])
        name = data[p + 24 + esz:p + 24 + esz + nsz].decode()
        ent = struct.unpack(">%dQ" % tsize, data[toff:toff + 8 * tsize])
        out[name] = [e & 0x00fffffffffffe00 for e in ent]
        p += (24 + esz + nsz + 7) // 8 * 8
    assert cs
    return out


def extents(img, name):
    p = run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:" + name, "--",
             "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name, img, "]"])
    out = []
    for e in json.loads(p):
        if e["type"] & 1:
            if out and out[-1][0] + out[-1][1] == e["offset"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["offset"], e["length"]))
    return out


def check(img):
    run(["qemu-img", "check", "-q", img])


def make(tmp, name, refcount_bits=16):
    """64 MiB, 4 KiB clusters, bitmap 'a' (512 B granularity: four data
    clusters) dirty in several places."""
    img = os.path.join(tmp, name)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         "cluster_size=4096,refcount_bits=%d" % refcount_bits, img, "64M"])
    run(["qemu-img", "bitmap", "--add", "-g", "512", img, "a"])
    run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", "-c", "write 20M 1k",
         "-c", "write 40M 512", "-c", "write 63M 1M", img])
    return img


def scenario_same_image(qbm, tmp):
    img = make(tmp, "s.qcow2")
    want = extents(img, "a")
    run([qbm, "add", "-g", "512", img, "t"])
    run([qbm, "merge", img, "t", "a"])
    check(img)
    t = tables(img)
    data_a = [o for o in t["a"] if o]
    if len(data_a) < 3 or t["t"] != t["a"]:
        raise Fail("merge into an empty bitmap did not share the clusters: "
                   "a=%s t=%s" % (t["a"], t["t"]))
    if extents(img, "t") != want or extents(img, "a") != want:
        raise Fail("shared bitmaps read back wrong")
    # QEMU rewrites both enabled bitmaps on close, freeing the shared
    # clusters once per bitmap.
    run(["qemu-io", "-f", "qcow2", "-c", "write 30M 4k", img])
    check(img)
    want2 = sorted(want + [(30 << 20, 4096)])
    if extents(img, "t") != want2 or extents(img, "a") != want2:
        raise Fail("after QEMU's rewrite: %s" % extents(img, "t"))
    # Share again; QEMU removes one sharer, qbm clears the other.
    run([qbm, "remove", img, "t"])
    run([qbm, "add", "-g", "512", img, "t"])
    run([qbm, "merge", img, "t", "a"])
    run(["qemu-img", "bitmap", "--remove", img, "a"])
    check(img)
    if extents(img, "t") != want2:
        raise Fail("removing one sharer changed the other")
    run([qbm, "add", "-g", "512", img, "a"])
    run([qbm, "merge", img, "a", "t"])
    run([qbm, "clear", img, "t"])
    check(img)
    if extents(img, "a") != want2 or extents(img, "t") != []:
        raise Fail("clearing one sharer changed the other")
    # A rewrite of a bitmap that changes one chunk keeps the others.
    before = [o for o in tables(img)["a"] if o]
    run([qbm, "merge", img, "a", "t"])  # t is empty: nothing changes
    run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", img])
    run([qbm, "populate", img, "a"])
    check(img)
    after = tables(img)["a"]
    kept = [o for o in before if o in after]
    if len(kept) < len(before) - 1:
        raise Fail("populate rewrote unchanged clusters: %s -> %s" %
                   (before, after))
    out = run([qbm, "check", img])
    if "No problems" not in out:
        raise Fail("qbm check: %s" % out)


def scenario_no_share(qbm, tmp):
    img = make(tmp, "r1.qcow2", refcount_bits=1)
    want = extents(img, "a")
    run([qbm, "add", "-g", "512", img, "t"])
    run([qbm, "merge", img, "t", "a"])
    check(img)
    t = tables(img)
    shared = set(o for o in t["a"] if o) & set(o for o in t["t"] if o)
    if shared:
        raise Fail("refcount_bits=1 cannot share, but %s are" % shared)
    if extents(img, "t") != want:
        raise Fail("copied bitmap reads back wrong")


def scenario_other_image(qbm, tmp):
    src = make(tmp, "src.qcow2")
    img = os.path.join(tmp, "dst.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
         img, "64M"])
    run([qbm, "add", "-g", "512", img, "t"])
    run([qbm, "merge", "-b", src, img, "t", "a"])
    check(img)
    check(src)
    if extents(img, "t") != extents(src, "a"):
        raise Fail("merge -b reads back wrong")
    run([qbm, "copy", src, img])
    check(img)
    if extents(img, "a") != extents(src, "a"):
        raise Fail("copy reads back wrong")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qbm", required=True)
    args = ap.parse_args()
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        print("missing tools: %s" % " ".join(missing))
        return 1 if os.environ.get("CI") else 77
    passed = failed = 0
    for fn in (scenario_same_image, scenario_no_share, scenario_other_image):
        with tempfile.TemporaryDirectory(prefix="qbm-share-") as tmp:
            try:
                fn(args.qbm, tmp)
                passed += 1
            except Fail as e:
                failed += 1
                print("FAIL %s: %s" % (fn.__name__, e))
    print("sharing: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
