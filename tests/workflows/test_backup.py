#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Backup chains: extract, restore, restore --link, consolidate.

A live disk changes in random steps (data, compressed and zero writes,
discards). After a full backup, each step ends with `qbm extract --rotate`,
an incremental holding exactly the clusters the checkpoint marks. Then the
disk is rebuilt to every point, as raw and as qcow2, and QEMU judges:
`qemu-img compare` against the saved state of that point, `qemu-img check`
on qcow2 output, and the same result as `qemu-img rebase -u` + `qemu-img
convert` of the same files. Refusals must write nothing.
Seeded; QBM_TEST_SEED reproduces a run.
"""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (MiB, Fail, RandomWriter, Suite, qemu_img,  # noqa: E402
                     qemu_img_check, qemu_img_compare as same,
                     qemu_img_create, qemu_img_info)


def data_bytes(img):
    """Bytes the image itself stores as data (not zero flags)."""
    p = qemu_img("map", "--output=json", img)
    return sum(e["length"] for e in json.loads(p.stdout)
               if e["depth"] == 0 and e["data"])


def scenario(qbm, tmp, rng, desc):
    size = rng.choice([16, 48, 130]) * MiB + rng.choice([0, 512, 65536])
    opts = rng.choice(["cluster_size=65536", "cluster_size=4096",
                       "compression_type=zstd", "extended_l2=on",
                       "cluster_size=2M", "refcount_bits=1"])
    disk = os.path.join(tmp, "disk.qcow2")
    qemu_img_create(disk, size, opts=opts)
    gran = rng.choice([512, 4096, 65536, MiB])
    desc.append("size %d, %s, granularity %d" % (size, opts, gran))

    ccs = {"cluster_size=4096": 4096, "cluster_size=2M": 2 * MiB}.get(
        opts, 65536)
    writer = RandomWriter(disk, size, ccs, rng,
                          compress="extended_l2" not in opts)
    step = writer.step

    step(6)
    qbm("add", "-g", str(gran), disk, "ck0")
    full = os.path.join(tmp, "full.qcow2")
    if rng.random() < 0.5:
        qbm("extract", "--full", "-o", full, disk)
    else:
        full = os.path.join(tmp, "full.raw")
        qemu_img("convert", "-O", "raw", disk, full)
    states = [os.path.join(tmp, "state0.qcow2")]
    shutil.copyfile(disk, states[0])
    incs = []
    nsteps = rng.randint(1, 4)
    for i in range(1, nsteps + 1):
        step(rng.randint(1, 6))
        inc = os.path.join(tmp, "inc%d.qcow2" % i)
        qbm("extract", "--rotate", "ck%d" % i, "-o", inc, disk,
            "ck%d" % (i - 1))
        qemu_img_check(inc)
        # An incremental holds no more than its checkpoint's dirty data,
        # rounded to its clusters.
        extents = qbm.dump(disk, "ck%d" % (i - 1))
        cs = qemu_img_info(inc)["cluster-size"]
        limit = sum(-(-(off + length) // cs) * cs - off // cs * cs
                    for off, length in extents)
        if data_bytes(inc) > limit:
            raise Fail("inc%d stores %d bytes of data, its checkpoint marks "
                       "only %d" % (i, data_bytes(inc), limit))
        incs.append(inc)
        states.append(os.path.join(tmp, "state%d.qcow2" % i))
        shutil.copyfile(disk, states[-1])

    # Restore to every point, both formats.
    for i in range(0, nsteps + 1):
        for fmt in ("raw", "qcow2"):
            out = os.path.join(tmp, "out.%s" % fmt)
            qbm("restore", "-O", fmt, "-o", out, full, *incs[:i])
            if fmt == "qcow2":
                qemu_img_check(out)
            if not same(out, states[i]):
                raise Fail("restore to point %d as %s differs" % (i, fmt))
            os.unlink(out)
    # QEMU's own way with the same files: rebase -u into a chain, convert.
    copies = []
    for i, inc in enumerate(incs):
        c = os.path.join(tmp, "chain%d.qcow2" % i)
        shutil.copyfile(inc, c)
        copies.append(c)
    prev, prev_fmt = full, "raw" if full.endswith(".raw") else "qcow2"
    for c in copies:
        qemu_img("rebase", "-u", "-b", os.path.basename(prev), "-F",
                 prev_fmt, c)
        prev, prev_fmt = c, "qcow2"
    conv = os.path.join(tmp, "conv.raw")
    qemu_img("convert", "-O", "raw", prev, conv)
    ours = os.path.join(tmp, "ours.raw")
    qbm("restore", "-o", ours, full, *incs)
    if open(conv, "rb").read() != open(ours, "rb").read():
        raise Fail("restore differs from qemu-img rebase -u + convert")
    # restore --link makes the same chain; QEMU reads the disk through it.
    links = []
    for i, inc in enumerate(incs):
        c = os.path.join(tmp, "link%d.qcow2" % i)
        shutil.copyfile(inc, c)
        links.append(c)
    qbm("restore", "--link", full, *links)
    if not same(links[-1], states[-1]):
        raise Fail("the --link chain does not read as the disk")
    # Rolling full: consolidate into a qcow2 copy of the full backup.
    if full.endswith(".qcow2"):
        rolled = os.path.join(tmp, "rolled.qcow2")
        shutil.copyfile(full, rolled)
        qbm("consolidate", rolled, *incs)
        qemu_img_check(rolled)
        if not same(rolled, states[-1]):
            raise Fail("consolidate does not give the last state")


def refusals(qbm, tmp):
    a = os.path.join(tmp, "a.qcow2")
    b = os.path.join(tmp, "b.qcow2")
    junk = os.path.join(tmp, "junk.qcow2")
    qemu_img_create(a, "64M")
    qemu_img_create(b, "32M")
    with open(junk, "wb") as f:
        f.write(b"QFI\xfb" + b"\xff" * 200)
    out = os.path.join(tmp, "out.raw")
    cases = [
        ([a, b], "virtual size"),
        ([a, os.path.join(tmp, "missing.qcow2")], "missing.qcow2"),
        ([a, junk], "junk.qcow2"),
        ([a, a], "twice"),
    ]
    for files, word in cases:
        p = qbm("restore", "-o", out, *files, ok=(1,))
        if word not in p.stderr or p.stdout:
            raise Fail("refusal without a clear message: %r" % p.stderr)
        left = [f for f in os.listdir(tmp) if f.startswith(".out") or
                f.startswith("out")]
        if left:
            raise Fail("a refused restore left %s behind" % left)
    p = qbm("consolidate", a, b, ok=(1,))
    if "size" not in p.stderr:
        raise Fail("consolidate of another size: %r" % p.stderr)


def main():
    suite = Suite("backup", __doc__, tools=["qemu-img", "qemu-io"],
                  seeded=True)
    suite.parser.add_argument("--rounds", type=int, default=12)
    args = suite.start()
    for rnd in suite.indices(args.rounds + 1):
        desc = []
        if rnd == args.rounds:
            desc.append("refusals")
            fn = lambda tmp: refusals(suite.qbm, tmp)  # noqa: E731
        else:
            fn = lambda tmp: scenario(suite.qbm, tmp,  # noqa: E731
                                      suite.rng(rnd), desc)
        suite.case(lambda: "round %d (seed %d; %s)" % (rnd, suite.seed,
                                                       "; ".join(desc)),
                   fn, index=rnd)
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
