#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Differential test of the editing commands against qemu-img bitmap.

Two copies of an image receive the same random sequence of edits, one
through `qemu-img bitmap` (--add [-g] [--disable], --remove, --clear,
--enable, --disable, --merge [-b -F]), the other through qbm, interleaved
with identical qemu-io writes, zero writes and discards (which make the
enabled bitmaps dirty). After every round QEMU must see the same thing in
both: `qemu-img check` clean (qbm's copy without leaks too), the same
names, granularities and flags (qemu-img info), the same dirty extents
(qemu-nbd -B + nbdinfo) and the same data (qemu-img compare). A rename is
modelled on the QEMU side as add + merge + remove. Seeded: QBM_TEST_SEED.
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (MiB, Fail, Suite, dirty_map, qemu_bitmaps,  # noqa: E402
                     qemu_img, qemu_img_check, qemu_img_create, qemu_io, run)


def view(img):
    """What QEMU sees: {name: (granularity, flags, extents)}."""
    return {name: (gran, flags, dirty_map(img, name))
            for name, (gran, flags) in qemu_bitmaps(img).items()}


def scenario(qbm, tmp, rng, log):
    cs = rng.choice([512, 4096, 65536, 65536, 2 * MiB])
    size = rng.choice([8, 64, 200]) * MiB + rng.choice([0, 512, 70000 * 512])
    opts = "cluster_size=%d,refcount_bits=%d" % (
        cs, rng.choice([1, 2, 4, 8, 16, 16, 32, 64]))
    if cs >= 16384 and rng.random() < 0.2:
        opts += ",extended_l2=on"
    q = os.path.join(tmp, "q.qcow2")
    b = os.path.join(tmp, "b.qcow2")
    other = os.path.join(tmp, "other.qcow2")
    qemu_img_create(q, size, opts=opts)
    qemu_img_create(other, size)
    qemu_img("bitmap", "--add", "-g", "4096", other, "src")
    qemu_io(other, "write 0 1M", "write %d 64k" % (size // 2))
    if cs == 512 and rng.random() < 0.5:
        # Fill so that the refcount table must grow while qbm allocates.
        qemu_io(q, "write 0 %d" % (size // 2))
    shutil.copyfile(q, b)
    log.append("%s size %d" % (opts, size))
    names = []
    for step in range(rng.randint(4, 10)):
        k = rng.random()
        qcmd = bcmd = None
        if k < 0.3 or not names:
            gran = rng.choice([512, 4096, 65536, MiB, 16 * MiB])
            name = "n%d" % step
            dis = rng.random() < 0.3
            qcmd = ["qemu-img", "bitmap", "--add", "-g", str(gran)] + \
                (["--disable"] if dis else []) + [q, name]
            bcmd = [qbm, "add", "-g", str(gran)] + \
                (["--disabled"] if dis else []) + [b, name]
            names.append(name)
        elif k < 0.4:
            n = names.pop(rng.randrange(len(names)))
            qcmd = ["qemu-img", "bitmap", "--remove", q, n]
            bcmd = [qbm, "remove", b, n]
        elif k < 0.5:
            n = rng.choice(names)
            qcmd = ["qemu-img", "bitmap", "--clear", q, n]
            bcmd = [qbm, "clear", b, n]
        elif k < 0.6:
            n = rng.choice(names)
            w = rng.choice(["enable", "disable"])
            qcmd = ["qemu-img", "bitmap", "--" + w, q, n]
            bcmd = [qbm, w, b, n]
        elif k < 0.7 and len(names) >= 2:
            t, s = rng.sample(names, 2)
            qcmd = ["qemu-img", "bitmap", "--merge", s, q, t]
            bcmd = [qbm, "merge", b, t, s]
        elif k < 0.75:
            t = rng.choice(names)
            qcmd = ["qemu-img", "bitmap", "--merge", "src", "-b", other,
                    "-F", "qcow2", q, t]
            bcmd = [qbm, "merge", "-b", other, b, t, "src"]
        elif k < 0.8:
            old = names.pop(rng.randrange(len(names)))
            new = "r%d" % step
            names.append(new)
            g, fl = qemu_bitmaps(q)[old]
            qemu_img(*(["bitmap", "--add", "-g", str(g)] +
                       ([] if "auto" in fl else ["--disable"]) + [q, new]))
            qemu_img("bitmap", "--merge", old, q, new)
            qcmd = ["qemu-img", "bitmap", "--remove", q, old]
            bcmd = [qbm, "rename", b, old, new]
        else:
            c = []
            for _ in range(rng.randint(1, 6)):
                length = rng.choice([512, 4096, 65536, 300000])
                off = rng.randrange(0, size - length) // 512 * 512
                length = -(-length // 512) * 512
                c += ["-c", rng.choice(["write", "write -z", "discard"]) +
                      " %d %d" % (off, length)]
            qcmd = ["qemu-io", "-f", "qcow2"] + c + [q]
            bcmd = ["qemu-io", "-f", "qcow2"] + c + [b]
        log.append(" ".join(bcmd[1:]))
        rq = run(qcmd, ok=None).returncode
        rb = run(bcmd, ok=None).returncode
        if (rq == 0) != (rb == 0):
            raise Fail("qemu-img exit %d but qbm exit %d for %s" %
                       (rq, rb, bcmd))
    for img, who in ((q, "qemu-img"), (b, "qbm")):
        try:
            qemu_img_check(img)
        except Fail as e:
            raise Fail("the %s copy: %s" % (who, e))
    vq, vb = view(q), view(b)
    if vq != vb:
        raise Fail("QEMU sees different bitmaps:\n qemu-img copy %s\n qbm "
                   "copy      %s" % ({k: v[:2] for k, v in vq.items()},
                                     {k: v[:2] for k, v in vb.items()}) +
                   "".join("\n  %s extents differ" % k for k in vq
                           if k in vb and vq[k][2] != vb[k][2]))
    qemu_img("compare", q, b)


def logged(qbm, tmp, rng):
    """A scenario whose failure lists the steps that led to it."""
    log = []
    try:
        scenario(qbm, tmp, rng, log)
    except Fail as e:
        raise Fail("%s\n  steps: %s" % (e, " | ".join(log)))


def main():
    suite = Suite("differential", __doc__, seeded=True)
    suite.parser.add_argument("--scenarios", type=int, default=30)
    args = suite.start()
    suite.scenarios(args.scenarios,
                    lambda tmp, rng: logged(suite.qbm.path, tmp, rng))
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
