#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""qbm info and qbm dump against QEMU, over seeded random scenarios.

Each scenario makes an image with qemu-img (random cluster size 512 B..2 MiB,
refcount width 1..64, extended L2, zstd, odd virtual sizes, compat 0.10),
adds bitmaps of random granularity (512 B..64 MiB), enables, disables and
clears them in random order between random qemu-io writes, zero writes,
compressed writes and discards, sometimes crashes (qemu-io -c abort leaves
bitmaps in use) and sometimes puts it in a backing chain. Then:
  - qbm info --output=json must agree with qemu-img info --output=json
    (sizes, compat, refcount bits, compression, extended L2, backing,
    bitmap names, granularities and flags) and dirty-bytes must equal the
    sum of QEMU's dirty extents;
  - qbm dump --output=json (and the human form) must list exactly the
    extents qemu-nbd -B + nbdinfo --map reports, for every consistent
    bitmap;
  - qbm info --chain and dump --chain must agree with each layer.
The seed is printed; QBM_TEST_SEED replays a run.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (MiB, Fail, Suite, dirty_map, merge_extents,  # noqa: E402
                     qemu_img, qemu_img_create, qemu_img_info, qemu_io)


def compare_info(qbm, img, q, b, where):
    """q: qemu-img info JSON of one layer, b: qbm info JSON of it."""
    data = q.get("format-specific", {}).get("data", {})
    checks = [("virtual-size", q["virtual-size"]),
              ("cluster-size", q["cluster-size"]),
              ("compat", data.get("compat")),
              ("refcount-bits", data.get("refcount-bits")),
              ("compression-type", data.get("compression-type", "zlib")),
              ("extended-l2", data.get("extended-l2", False)),
              ("lazy-refcounts", data.get("lazy-refcounts", False)),
              ("corrupt", data.get("corrupt", False))]
    if "backing-filename" in q:
        checks.append(("backing-filename", q["backing-filename"]))
        checks.append(("full-backing-filename", q["full-backing-filename"]))
    if "backing-filename-format" in q:
        checks.append(("backing-filename-format",
                       q["backing-filename-format"]))
    for key, want in checks:
        if b.get(key) != want:
            raise Fail("%s: info %s is %r, qemu-img says %r" %
                       (where, key, b.get(key), want))
    qb = [(x["name"], x["granularity"], sorted(x["flags"]))
          for x in data.get("bitmaps", [])]
    ob = [(x["name"], x["granularity"], sorted(x["flags"]))
          for x in b["bitmaps"]]
    if sorted(qb) != sorted(ob):
        raise Fail("%s: bitmaps %s, qemu-img says %s" % (where, ob, qb))
    for x in b["bitmaps"]:
        if x["consistent"] != ("in-use" not in x["flags"]):
            raise Fail("%s: %s consistent=%s with flags %s" %
                       (where, x["name"], x["consistent"], x["flags"]))
        if not x["consistent"]:
            continue
        ext = dirty_map(img, x["name"])
        if x["dirty-bytes"] != sum(n for _, n in ext):
            raise Fail("%s: %s dirty-bytes %d, QEMU's extents sum to %d" %
                       (where, x["name"], x["dirty-bytes"],
                        sum(n for _, n in ext)))
        got = qbm.dump(img, x["name"])
        if got != ext:
            raise Fail("%s: dump %s differs from QEMU:\n qbm  %s\n qemu %s" %
                       (where, x["name"], got[:20], ext[:20]))
        human = qbm("dump", img, x["name"]).stdout.splitlines()
        if [tuple(map(int, line.split())) for line in human[1:]] != ext or \
                not human[0].startswith("# "):
            raise Fail("%s: human dump of %s differs" % (where, x["name"]))


def scenario(qbm, tmp, rng):
    desc = []
    cs = rng.choice([512, 4096, 65536, 65536, 2 * MiB])
    size = rng.choice([1, 7, 64, 300]) * MiB + rng.choice(
        [0, 512, 65536, 12345 * 512])
    opts = ["cluster_size=%d" % cs,
            "refcount_bits=%d" % rng.choice([1, 2, 4, 8, 16, 16, 32, 64])]
    if cs >= 16384 and rng.random() < 0.25:
        opts.append("extended_l2=on")
    if rng.random() < 0.25:
        opts.append("compression_type=zstd")
    v2 = rng.random() < 0.08
    if v2:
        opts = ["compat=0.10", "cluster_size=%d" % cs]
    img = os.path.join(tmp, "img.qcow2")
    backing = None
    if rng.random() < 0.3:
        backing = os.path.join(tmp, "base.qcow2")
        qemu_img_create(backing, size)
        qemu_img("bitmap", "--add", backing, "shared")
        qemu_io(backing, "write 0 64k")
    qemu_img_create(img, size, opts=",".join(opts),
                    backing="base.qcow2" if backing else None)
    desc.append("%s, size %d%s" % (",".join(opts), size,
                                   ", with backing" if backing else ""))
    names = []

    def writes(n):
        c = []
        for _ in range(n):
            length = rng.choice([1, 512, 4096, 65536, 200000, MiB])
            off = rng.randrange(0, max(1, size - length))
            length = min(length, size - off)
            k = rng.random()
            if k < 0.6:
                c.append("write %d %d" % (off, length))
            elif k < 0.75 and not v2:
                c.append("write -z %d %d" % (off // 512 * 512,
                                             max(512, length // 512 * 512)))
            else:
                c.append("discard %d %d" % (off // 512 * 512,
                                            max(512, length // 512 * 512)))
        if c:
            qemu_io(img, *c, ok=None)

    steps = rng.randint(2, 8)
    for _ in range(steps):
        k = rng.random()
        if v2:
            writes(2)
            continue
        if k < 0.35 or not names:
            gran = rng.choice([512, 4096, 65536, 65536, MiB, 64 * MiB])
            name = rng.choice(["ck%d" % len(names), "b-%d" % len(names),
                               "x" * rng.randint(1, 40)])
            if name in names:
                continue
            cmd = ["bitmap", "--add", "-g", str(gran)]
            if rng.random() < 0.3:
                cmd.append("--disable")
            if qemu_img(*(cmd + [img, name]), ok=None).returncode == 0:
                names.append(name)
                desc.append("add %s g=%d" % (name, gran))
        elif k < 0.45:
            n = rng.choice(names)
            qemu_img("bitmap", rng.choice(["--enable", "--disable",
                                           "--clear"]), img, n, ok=None)
        else:
            writes(rng.randint(1, 5))
    if names and rng.random() < 0.15:
        qemu_io(img, "write 0 4k", "abort", ok=None)
        desc.append("crash")
    q = qemu_img_info(img)
    b = qbm.json("info", img)
    try:
        compare_info(qbm, img, q, b, "image")
        if backing:
            qc = qemu_img_info(img, "--backing-chain")
            bc = qbm.json("info", "--chain", img)
            if len(qc) != len(bc):
                raise Fail("chain of %d layers, qemu-img says %d" %
                           (len(bc), len(qc)))
            for layer, (ql, bl) in enumerate(zip(qc, bc)):
                compare_info(qbm, bl["filename"], ql, bl, "layer %d" % layer)
            got = qbm.dump("--chain", img, "shared")
            want = merge_extents(dirty_map(backing, "shared") +
                                 (dirty_map(img, "shared")
                                  if "shared" in names else []))
            if got != want:
                raise Fail("dump --chain differs: %s vs %s" % (got, want))
    except Fail as e:
        raise Fail("%s: %s" % ("; ".join(desc), e))


def main():
    suite = Suite("oracle", __doc__, seeded=True)
    suite.parser.add_argument("--scenarios", type=int, default=60)
    args = suite.start()
    suite.scenarios(args.scenarios,
                    lambda tmp, rng: scenario(suite.qbm, tmp, rng))
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
