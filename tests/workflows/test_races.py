#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Racing writers: many qbm editors (and QEMU) on one image at once.

Every edit that reports success must be in the image afterwards, every
loser must fail with a message about the lock (exit 1), and the image must
stay consistent (qemu-img check clean, QEMU reads every bitmap). Seeded;
QBM_TEST_SEED reproduces a run.
"""
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (Suite, qemu_bitmaps, qemu_img_check,  # noqa: E402
                     qemu_img_create)


def spawn(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def main():
    suite = Suite("races", __doc__, tools=["qemu-img", "qemu-io"],
                  seeded=True, indexed=False)
    suite.parser.add_argument("--rounds", type=int, default=6)
    suite.parser.add_argument("--procs", type=int, default=12)
    args = suite.start()
    rng = random.Random(suite.seed)
    qbm = suite.qbm.path
    wins = losses = 0
    with suite.tempdir() as tmp:
        img = os.path.join(tmp, "img.qcow2")
        qemu_img_create(img, "256M")
        expect = set()
        for rnd in range(args.rounds):
            procs = []
            for i in range(args.procs):
                name = "r%d_%d" % (rnd, i)
                if expect and rng.random() < 0.3:
                    victim = rng.choice(sorted(expect))
                    procs.append(("remove", victim,
                                  spawn([qbm, "remove", img, victim])))
                else:
                    procs.append(("add", name, spawn(
                        [qbm, "add", "-g",
                         str(rng.choice([512, 65536, 1 << 20])), img,
                         name])))
                if rng.random() < 0.2:
                    # QEMU joins the race: it either gets the image or not.
                    procs.append(("qemu", None, spawn(
                        ["qemu-io", "-f", "qcow2", "-c", "write %d 4k" %
                         (rng.randrange(0, 65536) * 4096), img])))
            for kind, name, p in procs:
                out, err = p.communicate()
                if kind == "qemu":
                    continue
                if p.returncode == 0:
                    wins += 1
                    if kind == "add":
                        expect.add(name)
                    else:
                        expect.discard(name)
                    suite.ok()
                elif p.returncode == 1 and "lock" in err and not out:
                    losses += 1
                    suite.ok()
                elif (p.returncode == 1 and kind == "remove" and
                      "no bitmap named" in err):
                    suite.ok()  # removed by a concurrent winner already
                else:
                    suite.fail("round %d: %s %s -> %d: %r" %
                               (rnd, kind, name, p.returncode, err))
            c = qemu_img_check(img, ok=None)
            names = set(qemu_bitmaps(img))
            if c.returncode != 0:
                suite.fail("round %d: qemu-img check rc=%d: %s" %
                           (rnd, c.returncode, c.stdout))
            if names != expect:
                suite.fail("round %d: bitmaps %s, expected %s (lost or "
                           "phantom edits)" % (rnd, sorted(names),
                                               sorted(expect)))
    print("%d edits won, %d lost the race for the lock" % (wins, losses))
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
