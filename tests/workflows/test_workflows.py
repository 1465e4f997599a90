#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""End-to-end repair workflows with QEMU doing the real steps and judging.

Each scenario builds a chain with qemu-img, writes with qemu-io, runs the
real QEMU operation (commit, external snapshot, crash), repairs with qbm,
and checks with qemu-img check and qemu-nbd + nbdinfo. Backup scenarios
prove the repaired bitmaps are usable: the previous full backup plus the
ranges the bitmap marks reproduce the current disk exactly.
Seeded random writes; QBM_TEST_SEED reproduces a run.
"""
import json
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (MiB, Fail, Suite, merge_extents as merge,  # noqa: E402
                     qemu_bitmaps, qemu_img_create, qemu_io, run)
# QEMU's view of a bitmap (qemu-nbd + nbdinfo), and qemu-img check clean.
from qbmtest import (dirty_map as qemu_bitmap,  # noqa: E402
                     qemu_img_check as check_clean)


def round_out(extents, gran, size):
    return merge([(o // gran * gran,
                   min(size, -(-(o + n) // gran) * gran) - o // gran * gran)
                  for o, n in extents])


def own_allocation(img):
    """Ranges this layer provides itself (data or zero), from qemu-img map."""
    p = run(["qemu-img", "map", "--output=json", img])
    return merge([(e["start"], e["length"]) for e in json.loads(p.stdout)
                  if e["depth"] == 0 and (e["data"] or e["zero"]) and
                  e.get("present", True)])


class Ctx:
    def __init__(self, qbm, tmp, rng):
        self.qbm, self.tmp, self.rng = qbm, tmp, rng

    def path(self, name):
        return os.path.join(self.tmp, name)

    def q(self, *args, ok=(0,)):
        return self.qbm(*args, ok=ok)

    def dump(self, img, name, chain=False):
        return self.qbm.dump(*((["--chain"] if chain else []) + [img, name]))

    def writes(self, img, size, n, zero_frac=0.2):
        """n random writes (some zero writes); returns the ranges."""
        cmds, ranges = [], []
        for _ in range(n):
            length = self.rng.choice([512, 4096, 65536, 3 * 65536, 1000])
            off = self.rng.randrange(0, size - length) // 512 * 512
            length = -(-length // 512) * 512
            kind = "write -z" if self.rng.random() < zero_frac else \
                "write -P %d" % self.rng.randrange(1, 255)
            cmds.append("%s %d %d" % (kind, off, length))
            ranges.append((off, length))
        qemu_io(img, *cmds)
        return merge(ranges)

    def create(self, name, size, backing=None, opts=None):
        return qemu_img_create(self.path(name), size, opts=opts,
                               backing=backing and os.path.basename(backing))


def covers(outer, inner):
    """Every byte of inner lies in outer."""
    outer = merge(outer)
    for o, n in inner:
        if not any(a <= o and o + n <= a + m for a, m in outer):
            return False
    return True


def scenario_commit(c):
    size = c.rng.choice([64, 96, 200]) * MiB
    g1 = c.rng.choice([4096, 65536, 512 * 1024])
    g2 = c.rng.choice([512, 65536, MiB])
    base = c.create("base.qcow2", size)
    run(["qemu-img", "bitmap", "--add", "-g", str(g1), base, "ck1"])
    before = c.writes(base, size, 6)
    top = c.create("top.qcow2", size, backing=base)
    # libvirt continues ck1 in the new layer and starts ck2 there.
    run(["qemu-img", "bitmap", "--add", "-g", str(g1), top, "ck1"])
    run(["qemu-img", "bitmap", "--add", "-g", str(g2), top, "ck2"])
    after = c.writes(top, size, 8)
    top_ck1 = qemu_bitmap(top, "ck1")
    top_ck2 = qemu_bitmap(top, "ck2")
    run(["qemu-img", "commit", "-q", "-d", top])
    # QEMU marks what the commit copies (whole clusters) in the base's
    # enabled ck1 itself; qbm must add exactly the top's ck1 to that.
    committed_ck1 = qemu_bitmap(base, "ck1")
    if "ck2" in qemu_bitmaps(base):
        raise Fail("qemu-img commit unexpectedly carried ck2")
    c.q("commit-bitmaps", top, base)
    check_clean(base)
    bms = qemu_bitmaps(base)
    if bms.get("ck2") != (g2, ["auto"]):
        raise Fail("base ck2 is %s" % (bms.get("ck2"),))
    if qemu_bitmap(base, "ck2") != top_ck2:
        raise Fail("base ck2 differs from top's ck2")
    ck1 = qemu_bitmap(base, "ck1")
    if not covers(ck1, before + after):
        raise Fail("base ck1 misses writes from before/after the snapshot")
    if ck1 != merge(committed_ck1 + top_ck1):
        raise Fail("base ck1 is not QEMU's committed ck1 | the top's ck1")
    # QEMU keeps recording in the carried bitmaps.
    more = c.writes(base, size, 2, zero_frac=0)
    if not covers(qemu_bitmap(base, "ck2"), more):
        raise Fail("QEMU does not record new writes in ck2")


def scenario_commit_mark_written(c):
    """A base bitmap the top lacks must learn what the commit writes."""
    size = 64 * MiB
    g = c.rng.choice([4096, 65536])
    base = c.create("base.qcow2", size)
    run(["qemu-img", "bitmap", "--add", "-g", str(g), base, "only_base"])
    c.writes(base, size, 3)
    start = qemu_bitmap(base, "only_base")
    top = c.create("top.qcow2", size, backing=base)
    c.writes(top, size, 8)
    alloc = own_allocation(top)
    c.q("commit-bitmaps", "--mark-written", top, base)
    check_clean(base)
    want = merge(start + round_out(alloc, g, size))
    if qemu_bitmap(base, "only_base") != want:
        raise Fail("--mark-written: base bitmap is not old | top allocation")


def scenario_commit_gap(c, deep, fill):
    """A checkpoint with a gap at the base (the base never had ck while the
    layers above and below do) must not be made to look whole: ck is not
    created in the base, a warning says so and check --chain keeps reporting
    the gap; --fill-gaps carries it with the base's own clusters marked."""
    size = c.rng.choice([64, 96]) * MiB
    g = c.rng.choice([4096, 65536, 512 * 1024])
    parent = c.create("parent.qcow2", size)
    run(["qemu-img", "bitmap", "--add", "-g", str(g), parent, "ck"])
    writes = c.writes(parent, size, 4)
    base = c.create("base.qcow2", size, backing=parent)
    writes += c.writes(base, size, 5)  # recorded nowhere
    top = mid = c.create("mid.qcow2" if deep else "top.qcow2", size,
                         backing=base)
    run(["qemu-img", "bitmap", "--add", "-g", str(g), mid, "ck"])
    writes += c.writes(mid, size, 4)
    if deep:
        top = c.create("top.qcow2", size, backing=mid)
        run(["qemu-img", "bitmap", "--add", "-g", str(g), top, "ck"])
        writes += c.writes(top, size, 4)
    p = c.q("check", "--chain", top, ok=(2,))
    if "missing from layer %d (%s)" % (2 if deep else 1, base) not in p.stdout:
        raise Fail("check --chain does not report the gap:\n" + p.stdout)
    opt = ["--fill-gaps"] if fill else []
    data = open(base, "rb").read()
    p = c.q(*(["commit-bitmaps", "--dry-run"] + opt + [top, base]))
    if fill:
        want = "would mark in bitmap 'ck' of %s the clusters of %s" % (base,
                                                                     base)
    else:
        want = "would not carry bitmap 'ck': %s lacks it" % base
    if want not in p.stdout or open(base, "rb").read() != data:
        raise Fail("dry run does not list the gap:\n" + p.stdout)
    commit = ["qemu-img", "commit", "-q"] + (["-b", base] if deep
                                             else ["-d"]) + [top]
    before = c.rng.random() < 0.5
    if before:
        run(commit)
    p = c.q(*(["commit-bitmaps"] + opt + [top, base]))
    warned = "warning: bitmap 'ck' not carried: %s lacks it" % base
    if (warned in p.stderr) == fill:
        raise Fail("%s warning:\n%s" % ("unexpected" if fill else "no",
                                            p.stderr))
    if not before:
        run(commit)
    check_clean(base)
    if not fill:
        if "ck" in qemu_bitmaps(base):
            raise Fail("ck was created in the base, hiding the gap")
        p = c.q("check", "--chain", base, ok=(2,))
        if "missing from layer 0 (%s)" % base not in p.stdout:
            raise Fail("check --chain does not report the gap after the "
                       "commit:\n" + p.stdout)
        return
    if qemu_bitmaps(base).get("ck") != (g, ["auto"]):
        raise Fail("base ck is %s" % (qemu_bitmaps(base).get("ck"),))
    ck = qemu_bitmap(base, "ck")
    if not covers(ck, own_allocation(base)):
        raise Fail("--fill-gaps: base ck is not a superset of the base's "
                   "allocation")
    if not covers(merge(ck + qemu_bitmap(parent, "ck")), writes):
        raise Fail("--fill-gaps: the checkpoint misses writes")
    c.q("check", "--chain", base)


# Gap shapes of a commit of t0 (top) and t1 into base. Each layer, top
# first: "X" has the bitmap enabled, "x" disabled, "-" not. `gaps`: the
# layers commit-bitmaps must report (by the rule in qbm_carry_commit's
# documentation, worked out by hand); empty: the bitmap is carried, unless
# a copy from t0 down to base is disabled: by default (as libvirt and vdsm)
# that is reported too and the bitmap not carried; --carry-disabled carries
# it, gaps permitting.
GAP_SHAPES = [
    (["X", "X", "X", "-"], []),
    (["X", "-", "X", "-"], ["t1"]),            # hole in a committed layer
    (["X", "X", "-", "X"], ["base"]),          # hole at the base
    (["X", "-", "-", "X"], ["t1", "base"]),
    (["X", "-", "X", "X"], ["t1"]),
    (["X", "-", "-", "-", "X"], ["t1", "base"]),  # below's hole is not ours
    (["X", "X", "X", "-", "X"], []),           # only a hole below the base
    (["X", "-", "-", "-"], []),                # started in the top
    (["-", "X", "-", "-"], ["t0"]),            # recording, top lacks it
    (["-", "x", "-", "-"], []),                # frozen before the top
    (["-", "X", "X", "-"], ["t0"]),
    (["x", "-", "x", "-"], ["t1"]),
]


def scenario_commit_gap_shapes(c):
    size = 16 * MiB
    for shape, gaps in GAP_SHAPES:
        names = ["t0", "t1", "base"] + ["b%d" % i
                                        for i in range(len(shape) - 3)]
        path = {}
        for i in reversed(range(len(shape))):
            n = names[i]
            if os.path.exists(c.path(n)):
                os.unlink(c.path(n))
            path[n] = c.create(n, size, backing=path.get(names[i + 1])
                               if i + 1 < len(shape) else None)
            if shape[i] != "-":
                run(["qemu-img", "bitmap", "--add"] +
                    (["--disable"] if shape[i] == "x" else []) +
                    [path[n], "X"])
        off = [n for n in names[:3] if shape[names.index(n)] == "x"]
        for fill, incl in ((False, False), (True, False), (False, True),
                           (True, True)):
            opt = (["--fill-gaps"] if fill else []) + (
                ["--carry-disabled"] if incl else [])
            p = c.q(*(["commit-bitmaps", "-n"] + opt +
                      [path["t0"], path["base"]]))
            got = [n for n in names if
                   ("would mark in bitmap 'X' of %s the clusters of %s,"
                    % (path["base"], path[n]) if fill else
                    "would not carry bitmap 'X': %s lacks it" % path[n])
                   in p.stdout]
            got_off = [n for n in names if
                       "would not carry bitmap 'X': %s's copy is disabled"
                       % path[n] in p.stdout]
            want_off = [] if incl else off
            # A bitmap a disabled copy stops has no gap filled either.
            want = [] if fill and want_off else gaps
            carried = "bitmap 'X' of %s into" % path["t0" if shape[0] != "-"
                                                       else "t1"]
            if got != want or got_off != want_off or \
                    (carried in p.stdout) != ((fill or not gaps) and
                                              not want_off) or \
                    p.stderr.count("warning") != len(want_off) + (
                        0 if fill else len(gaps)):
                raise Fail("shape %s %s: gaps %s, want %s; disabled %s, "
                           "want %s\n%s%s" % (shape, opt, got, want, got_off,
                                               want_off, p.stdout, p.stderr))
        # Every gap commit-bitmaps sees is one check --chain reports.
        if gaps:
            c.q("check", "--chain", path["t0"], ok=(2,))


def scenario_snapshot(c):
    size = c.rng.choice([64, 128]) * MiB
    g = c.rng.choice([512, 65536, 4 * MiB])
    base = c.create("base.qcow2", size)
    run(["qemu-img", "bitmap", "--add", "-g", str(g), base, "ck1"])
    run(["qemu-img", "bitmap", "--add", "--disable", base, "old"])
    before = c.writes(base, size, 5)
    top = c.create("top.qcow2", size, backing=base)  # no bitmap handling
    after = c.writes(top, size, 7)
    # libvirt's model keeps the base's copy recording; --disable-base is
    # the older one.
    disable = c.rng.random() < 0.5
    c.q(*(["snapshot-bitmaps"] + (["--disable-base"] if disable else []) +
          [base, top]))
    check_clean(top)
    check_clean(base)
    tb = qemu_bitmaps(top)
    if tb.get("ck1") != (g, ["auto"]) or "old" in tb:
        raise Fail("top bitmaps are %s" % tb)
    if qemu_bitmap(top, "ck1") != round_out(own_allocation(top), g, size):
        raise Fail("top ck1 is not the top's allocation")
    if not covers(qemu_bitmap(top, "ck1"), after):
        raise Fail("top ck1 misses writes since the snapshot")
    if qemu_bitmaps(base).get("ck1") != (g, [] if disable else ["auto"]):
        raise Fail("base ck1 is %s (--disable-base: %s)" % (
            qemu_bitmaps(base).get("ck1"), disable))
    # libvirt's rule: every copy records, except after --disable-base
    # (the disabled "old" is a finding either way).
    p = c.q("check", "--chain", "--output=json", top, ok=(2,))
    rules = [(q["rule"], q["layer"]) for q in json.loads(p.stdout)[0][
        "problems"] if q.get("bitmap") == "ck1"]
    if rules != ([("disabled", 1)] if disable else []):
        raise Fail("check --chain finds %s for ck1" % rules)
    union = c.dump(top, "ck1", chain=True)
    if union != merge(qemu_bitmap(base, "ck1") + qemu_bitmap(top, "ck1")):
        raise Fail("dump --chain is not the union of the layers")
    if not covers(union, before + after):
        raise Fail("the checkpoint misses writes")
    later = c.writes(top, size, 3, zero_frac=0)
    if not covers(qemu_bitmap(top, "ck1"), later):
        raise Fail("QEMU does not keep tracking in the top's ck1")


def scenario_snapshot_deep_gap(c):
    """snapshot-bitmaps continues a checkpoint that already has a gap deeper
    in the chain; check --chain must still report that gap afterwards."""
    size = 16 * MiB
    parent = c.create("parent.qcow2", size)
    run(["qemu-img", "bitmap", "--add", parent, "ck"])
    mid = c.create("mid.qcow2", size, backing=parent)
    base = c.create("base.qcow2", size, backing=mid)
    run(["qemu-img", "bitmap", "--add", base, "ck"])
    top = c.create("top.qcow2", size, backing=base)
    c.q("snapshot-bitmaps", base, top)
    if "ck" not in qemu_bitmaps(top):
        raise Fail("snapshot-bitmaps did not continue ck")
    p = c.q("check", "--chain", top, ok=(2,))
    if "missing from layer 2 (%s)" % mid not in p.stdout:
        raise Fail("check --chain does not report the gap:\n" + p.stdout)


def scenario_crash(c, mode):
    size = 64 * MiB
    img = c.create("vm.qcow2", size)
    run(["qemu-img", "bitmap", "--add", img, "ck"])
    run(["qemu-img", "bitmap", "--add", "-g", "512", img, "fine"])
    c.writes(img, size, 3)
    run(["qemu-io", "-f", "qcow2", "-c", "write 1M 64k", "-c", "abort", img],
        ok=None)
    flags = qemu_bitmaps(img)
    if flags["ck"][1] != ["auto", "in-use"]:
        raise Fail("the crash did not leave ck in use: %s" % flags)
    data = open(img, "rb").read()
    p = c.q("check", img, ok=(2,))
    if "in use" not in p.stdout or open(img, "rb").read() != data:
        raise Fail("check did not report in-use bitmaps read-only")
    c.q("check", "--repair", "--in-use=" + mode, img)
    check_clean(img)
    c.q("check", img)
    if mode == "remove":
        if qemu_bitmaps(img):
            raise Fail("in-use bitmaps were not removed")
        return
    for name, (gran, fl) in qemu_bitmaps(img).items():
        if fl != ["auto"]:
            raise Fail("%s still has flags %s" % (name, fl))
        if qemu_bitmap(img, name) != [(0, size)]:
            raise Fail("%s is not all dirty after the repair" % name)


def scenario_populate(c):
    size = c.rng.choice([32, 100]) * MiB
    g = c.rng.choice([512, 4096, 65536, 2 * MiB])
    opts = c.rng.choice([None, "cluster_size=4096", "extended_l2=on",
                         "cluster_size=2M"])
    base = c.create("base.qcow2", size)
    c.writes(base, size, 4)
    top = c.create("top.qcow2", size, backing=base, opts=opts)
    c.writes(top, size, 10, zero_frac=0.4)
    run(["qemu-io", "-f", "qcow2", "-c", "discard 0 64k", top])
    c.q("add", "-g", str(g), "--disabled", top, "p")
    c.q("populate", top, "p")
    check_clean(top)
    if qemu_bitmap(top, "p") != round_out(own_allocation(top), g, size):
        raise Fail("populate differs from the layer's allocation "
                   "(opts %s, granularity %d)" % (opts, g))


def scenario_backup(c):
    """Full backup, then writes, a crash and a repair: full + the ranges the
    repaired checkpoint marks reproduce the disk exactly."""
    size = 48 * MiB
    img = c.create("disk.qcow2", size)
    c.writes(img, size, 10)
    run(["qemu-img", "bitmap", "--add", img, "ck"])
    full = c.path("full.raw")
    run(["qemu-img", "convert", "-O", "raw", img, full])
    c.writes(img, size, 10)
    if c.rng.random() < 0.5:
        run(["qemu-io", "-f", "qcow2", "-c", "write 5M 4k", "-c", "abort",
             img], ok=None)
        c.q("check", "--repair", img)
    cur = c.path("cur.raw")
    run(["qemu-img", "convert", "-O", "raw", img, cur])
    restored = c.path("restored.raw")
    shutil.copyfile(full, restored)
    with open(cur, "rb") as src, open(restored, "r+b") as dst:
        for off, length in c.dump(img, "ck"):
            src.seek(off)
            dst.seek(off)
            dst.write(src.read(length))
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", restored, cur])


SCENARIOS = [
    ("commit", scenario_commit),
    ("commit --mark-written", scenario_commit_mark_written),
    ("commit over a gap at the base",
     lambda c: scenario_commit_gap(c, False, False)),
    ("commit over a gap under two layers",
     lambda c: scenario_commit_gap(c, True, False)),
    ("commit --fill-gaps", lambda c: scenario_commit_gap(c, False, True)),
    ("commit --fill-gaps, deep",
     lambda c: scenario_commit_gap(c, True, True)),
    ("commit gap shapes", scenario_commit_gap_shapes),
    ("snapshot", scenario_snapshot),
    ("snapshot over a deeper gap", scenario_snapshot_deep_gap),
    ("crash, repair to dirty", lambda c: scenario_crash(c, "dirty")),
    ("crash, repair by removal", lambda c: scenario_crash(c, "remove")),
    ("populate", scenario_populate),
    ("backup from a repaired bitmap", scenario_backup),
]


def main():
    suite = Suite("workflows", __doc__, seeded=True)
    suite.parser.add_argument("--rounds", type=int, default=3)
    args = suite.start()
    for rnd in suite.indices(args.rounds):
        for name, fn in SCENARIOS:
            rng = random.Random("%d-%d-%s" % (suite.seed, rnd, name))
            suite.case("round %d, %s (seed %d)" % (rnd, name, suite.seed),
                       lambda tmp: fn(Ctx(suite.qbm, tmp, rng)), index=rnd)
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
