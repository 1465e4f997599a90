#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Racing writers: many qbm editors (and QEMU) on one image at once.

Every edit that reports success must be in the image afterwards, every
loser must fail with a message about the lock (exit 1), and the image must
stay consistent (qemu-img check clean, QEMU reads every bitmap). Seeded;
QBM_TEST_SEED reproduces a run.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

TOOLS = ["qemu-img", "qemu-io"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qbm", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--procs", type=int, default=12)
    args = ap.parse_args()
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        print("missing tools: %s" % " ".join(missing))
        return 1 if os.environ.get("CI") else 77
    seed = int(os.environ.get("QBM_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print("seed %d (set QBM_TEST_SEED to reproduce)" % seed)
    passed = failed = wins = losses = 0
    with tempfile.TemporaryDirectory(prefix="qbm-race-") as tmp:
        img = os.path.join(tmp, "img.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img,
                        "256M"], check=True)
        expect = set()
        for rnd in range(args.rounds):
            procs = []
            for i in range(args.procs):
                name = "r%d_%d" % (rnd, i)
                if expect and rng.random() < 0.3:
                    victim = rng.choice(sorted(expect))
                    cmd = [args.qbm, "remove", img, victim]
                    procs.append(("remove", victim, subprocess.Popen(
                        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)))
                else:
                    cmd = [args.qbm, "add", "-g",
                           str(rng.choice([512, 65536, 1 << 20])), img, name]
                    procs.append(("add", name, subprocess.Popen(
                        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)))
                if rng.random() < 0.2:
                    # QEMU joins the race: it either gets the image or not.
                    procs.append(("qemu", None, subprocess.Popen(
                        ["qemu-io", "-f", "qcow2", "-c", "write %d 4k" %
                         (rng.randrange(0, 65536) * 4096), img],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)))
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
                    passed += 1
                elif p.returncode == 1 and "lock" in err and not out:
                    losses += 1
                    passed += 1
                elif (p.returncode == 1 and kind == "remove" and
                      "no bitmap named" in err):
                    passed += 1  # removed by a concurrent winner already
                else:
                    failed += 1
                    print("FAIL round %d: %s %s -> %d: %r" %
                          (rnd, kind, name, p.returncode, err))
            c = subprocess.run(["qemu-img", "check", img],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
            info = json.loads(subprocess.run(
                ["qemu-img", "info", "--output=json", img], check=True,
                stdout=subprocess.PIPE, text=True).stdout)
            names = {b["name"] for b in info.get("format-specific", {})
                     .get("data", {}).get("bitmaps", [])}
            if c.returncode != 0:
                failed += 1
                print("FAIL round %d: qemu-img check rc=%d: %s" %
                      (rnd, c.returncode, c.stdout))
            if names != expect:
                failed += 1
                print("FAIL round %d: bitmaps %s, expected %s (lost or "
                      "phantom edits)" % (rnd, sorted(names),
                                          sorted(expect)))
    print("%d edits won, %d lost the race for the lock" % (wins, losses))
    print("races: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
