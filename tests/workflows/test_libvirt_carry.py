#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Carrying bitmaps as libvirt does: commit-bitmaps, snapshot-bitmaps,
extract --rotate, on chains built with qemu-img the way libvirt leaves them.

The cases are ported from libvirt's tests/qemublocktestdata (the chains of
bitmap/basic.json and bitmap/snapshots.json, the merge lists of
bitmapblockcommit/*) and from vdsm's tests/storage/bitmaps_test.py, as
docs/checkpoint-rules.md records them; each names its source. Judges: the
merge list of the data file (what `commit-bitmaps -n` plans), the same
commit done with QEMU's own tools the way libvirt does it (qemu-img bitmap
--add/--merge of the bitmaps libvirt's rule finds valid, on a copy of the
chain), compared bitmap by bitmap through qemu-nbd + nbdinfo, and `qbm
check --chain` on the chain left after the commit.
"""
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qbmtest import (MiB, Fail, Suite, dirty_map,  # noqa: E402
                     merge_extents, qemu_bitmaps, qemu_img, qemu_img_check,
                     qemu_img_create, qemu_io, set_bitmap_in_use)
from test_chain_rules import libvirt_rule  # noqa: E402

SIZE = 32 * MiB
SLOT = 256 * 1024  # each guest write takes the next slot: 64 KiB in it

# Chains, bottom layer first; each layer is a list of steps:
#   "w"           a guest write (qemu-io) of 64 KiB at a fresh offset,
#                 recorded by the layer's enabled bitmaps
#   "+NAME"       a checkpoint: an enabled bitmap (qemu-img bitmap --add)
#   "+NAME:off"   a disabled one
#   "P"           libvirt's external snapshot: the layer is created with an
#                 empty enabled copy of every recording, consistent bitmap
#                 of the layer below (qemuSnapshotDiskBitmapsPropagate)
#   "S"           qbm snapshot-bitmaps BELOW LAYER (a snapshot taken
#                 without bitmap handling, repaired after its writes)
#   "!NAME"       NAME left in use, as a crash leaves it (flag patched)
#   "crash"       qemu-io writes and aborts: every bitmap so far in use
# The layer made last is L1, the top, as in libvirt's data.

# bitmap/basic.json: L1 has a b c d current, L2 to L5 none.
BASIC = [["w"], ["w"], ["w"], ["w"],
         ["w", "+a", "w", "+b", "+c", "w", "+d", "w", "+current", "w"]]
# bitmap/snapshots.json: L1 a b c d current; L2 a b c d; L3 a b c; L4 a;
# L5 a: checkpoints made between snapshots that propagated them.
SNAPSHOTS = [["+a", "w"],
             ["P", "w"],
             ["P", "w", "+b", "w", "+c", "w"],
             ["P", "w", "+d", "w"],
             ["P", "w", "+current", "w"]]
# The same history with snapshots taken without bitmap handling and
# repaired by qbm snapshot-bitmaps once the guest has written to them.
SNAPSHOTS_BY_QBM = [[s for s in layer if s != "P"] for layer in SNAPSHOTS]
for _layer in SNAPSHOTS_BY_QBM[1:]:
    _layer.insert(1, "S")
# bitmap/synthetic.json as far as images can hold it (no transient
# bitmaps, L1 a v3 image): L1 current in use, top-ok, top-inactive
# disabled; L2 d; L3 c disabled, d; L4 none; L5 a.
SYNTHETIC = [["+a", "w"], ["w"], ["+c:off", "+d", "w"], ["+d", "w"],
             ["+current", "+top-ok", "+top-inactive:off", "w", "!current"]]
# bitmapblockcommit/empty: a chain without bitmaps.
EMPTY = [["w"], ["w"]]

ALL5 = ["a", "b", "c", "d", "current"]

# libvirt's bitmapblockcommit cases: (data file, chain, commit top, base,
# {bitmap: the layers merged into the base, top first}, bitmaps added to
# the base first[, bitmaps not carried, with a warning]), read from the
# files (libvirt-tmp-activewrite, the running VM's writes during an active
# commit, has no offline twin).
COMMIT_CASES = [
    ("empty", EMPTY, 1, 2, {}, []),
    ("basic-1-2", BASIC, 1, 2, {n: [1] for n in ALL5}, ALL5),
    ("basic-1-3", BASIC, 1, 3, {n: [1] for n in ALL5}, ALL5),
    ("basic-2-3", BASIC, 2, 3, {}, []),
    ("snapshots-1-2", SNAPSHOTS, 1, 2, {n: [1] for n in ALL5},
     ["current"]),
    ("snapshots-1-3", SNAPSHOTS, 1, 3,
     {"current": [1], "a": [1, 2], "b": [1, 2], "c": [1, 2], "d": [1, 2]},
     ["current", "d"]),
    ("snapshots-1-4", SNAPSHOTS, 1, 4,
     {"current": [1], "d": [1, 2], "a": [1, 2, 3], "b": [1, 2, 3],
      "c": [1, 2, 3]}, ["current", "d", "b", "c"]),
    ("snapshots-1-5", SNAPSHOTS, 1, 5,
     {"current": [1], "d": [1, 2], "b": [1, 2, 3], "c": [1, 2, 3],
      "a": [1, 2, 3, 4]}, ["current", "d", "b", "c"]),
    ("snapshots-2-3", SNAPSHOTS, 2, 3,
     {"a": [2], "b": [2], "c": [2], "d": [2]}, ["d"]),
    ("snapshots-2-4", SNAPSHOTS, 2, 4,
     {"d": [2], "a": [2, 3], "b": [2, 3], "c": [2, 3]}, ["d", "b", "c"]),
    ("snapshots-2-5", SNAPSHOTS, 2, 5,
     {"d": [2], "b": [2, 3], "c": [2, 3], "a": [2, 3, 4]}, ["d", "b", "c"]),
    ("snapshots-3-4", SNAPSHOTS, 3, 4, {"a": [3], "b": [3], "c": [3]},
     ["b", "c"]),
    ("snapshots-3-5", SNAPSHOTS, 3, 5, {"b": [3], "c": [3], "a": [3, 4]},
     ["b", "c"]),
    ("snapshots-4-5", SNAPSHOTS, 4, 5, {"a": [4]}, []),
    # Not a data file: libvirt's rule applied to the synthetic chain. Only
    # top-ok is valid from L1: current is in use, top-inactive disabled,
    # d not in L1 (a gap above its copy in L2, for 1-3).
    ("synthetic-1-2 (derived)", SYNTHETIC, 1, 2, {"top-ok": [1]},
     ["top-ok"], ["current", "top-inactive"]),
    ("synthetic-1-3 (derived)", SYNTHETIC, 1, 3, {"top-ok": [1]},
     ["top-ok"], ["current", "top-inactive", "d"]),
]


def layer_path(tmp, n):
    return os.path.join(tmp, "L%d.qcow2" % n)


def build(qbm, tmp, spec):
    """The chain of spec in tmp; returns its layers, L1 first."""
    slot = [0]
    n = len(spec)
    for i, steps in enumerate(spec):
        path = layer_path(tmp, n - i)
        below = layer_path(tmp, n - i + 1) if i else None
        qemu_img_create(path, SIZE, backing=below and os.path.basename(below))
        for step in steps:
            if step == "w":
                qemu_io(path, "write -P %d %d 64k" % (slot[0] % 250 + 1,
                                                      slot[0] * SLOT))
                slot[0] += 1
            elif step == "P":
                for name, (gran, flags) in qemu_bitmaps(below).items():
                    if flags == ["auto"]:
                        qemu_img("bitmap", "--add", "-g", str(gran), path,
                                 name)
            elif step == "S":
                qbm("snapshot-bitmaps", below, path)
            elif step == "crash":
                qemu_io(path, "write -P 9 %d 64k" % (slot[0] * SLOT),
                        "abort", ok=None)
                slot[0] += 1
            elif step.startswith("!"):
                set_bitmap_in_use(path, step[1:])
            else:
                name, _, state = step[1:].partition(":")
                qemu_img("bitmap", "--add",
                         *(["--disable"] if state == "off" else []), path,
                         name)
    return [layer_path(tmp, k) for k in range(1, n + 1)]


def copy_chain(src_dir, dst_dir, count):
    os.mkdir(dst_dir)
    for k in range(1, count + 1):
        shutil.copyfile(layer_path(src_dir, k), layer_path(dst_dir, k))
    return [layer_path(dst_dir, k) for k in range(1, count + 1)]


def libvirt_commit(layers, top, base):
    """What libvirt does to the bitmaps when it commits layer `top` (1 =
    L1) into `base` (qemuBlockBitmapsHandleCommitFinish), done with
    qemu-img: every bitmap of the commit top that libvirt's rule finds
    valid from there down is merged from each layer above the base that
    has it into the base's, added first (enabled, the topmost copy's
    granularity) when the base lacks it. Returns {bitmap: [layers]}."""
    findings = libvirt_rule(layers[top - 1])
    base_path = layers[base - 1]
    merged = {}
    for name in qemu_bitmaps(layers[top - 1]):
        if findings.get(name):
            continue
        srcs = [k for k in range(top, base)
                if name in qemu_bitmaps(layers[k - 1])]
        if name not in qemu_bitmaps(base_path):
            gran = qemu_bitmaps(layers[srcs[0] - 1])[name][0]
            qemu_img("bitmap", "--add", "-g", str(gran), base_path, name)
        for k in srcs:
            qemu_img("bitmap", "--merge", name, "-b", layers[k - 1], "-F",
                     "qcow2", base_path, name)
        merged[name] = srcs
    return merged


PLAN = re.compile(r"would (copy|merge) bitmap '([^']*)' of (\S+) into (\S+)")


def same_bitmaps(a, b, what):
    """Images a and b have the same bitmaps, flags, granularities and
    dirty maps, by QEMU."""
    if qemu_bitmaps(a) != qemu_bitmaps(b):
        raise Fail("%s: bitmaps %s, libvirt's way %s" % (
            what, qemu_bitmaps(a), qemu_bitmaps(b)))
    for name, (_, flags) in qemu_bitmaps(a).items():
        if "in-use" in flags:
            continue  # QEMU exports no inconsistent bitmap
        if dirty_map(a, name) != dirty_map(b, name):
            raise Fail("%s: bitmap %s differs from libvirt's way: %s, %s" % (
                what, name, dirty_map(a, name), dirty_map(b, name)))


def commit_case(qbm, tmp, spec, top, base, sources, added, skipped=()):
    proto = os.path.join(tmp, "proto")
    os.mkdir(proto)
    n = len(spec)
    build(qbm, proto, spec)
    ours = copy_chain(proto, os.path.join(tmp, "qbm"), n)
    theirs = copy_chain(proto, os.path.join(tmp, "libvirt"), n)
    top_path, base_path = ours[top - 1], ours[base - 1]
    # The merge list, as the data file has it.
    p = qbm("commit-bitmaps", "-n", top_path, base_path)
    plan, copied = {}, []
    for verb, name, layer, into in PLAN.findall(p.stdout):
        if into != base_path:
            raise Fail("plan merges into %s:\n%s" % (into, p.stdout))
        plan.setdefault(name, []).append(ours.index(layer) + 1)
        if verb == "copy":
            copied.append(name)
    if plan != sources or sorted(copied) != sorted(added):
        raise Fail("plan %s, adding %s; libvirt's data: %s, adding %s\n%s" %
                   (plan, copied, sources, added, p.stdout))
    # What qbm does, against what libvirt does with QEMU's tools.
    before = open(base_path, "rb").read()
    p = qbm("commit-bitmaps", top_path, base_path)
    expect_warnings(p, ["bitmap '%s' not carried" % n for n in skipped])
    if not sources and open(base_path, "rb").read() != before:
        raise Fail("nothing to carry, yet the base changed")
    merged = libvirt_commit(theirs, top, base)
    if merged != sources:
        raise Fail("libvirt's way merges %s, its data says %s" % (merged,
                                                                 sources))
    same_bitmaps(base_path, theirs[base - 1], "L%d" % base)
    qemu_img_check(base_path)
    # The commit itself, and the layers above the base dropped: the chain
    # libvirt is left with. Every bitmap carried passes its rule.
    qemu_img("commit", "-q", "-b", base_path, top_path)
    new_top = base_path
    if top > 1:
        qemu_img("rebase", "-u", "-b", os.path.basename(base_path), "-F",
                 "qcow2", ours[top - 2])
        new_top = ours[0]
    found = libvirt_rule(new_top)
    bad = {name: found[name] for name in sources if found.get(name)}
    if bad:
        raise Fail("after the commit libvirt's rule finds %s" % bad)
    if not any(found.values()):
        qbm("check", "--chain", new_top)
    else:  # the synthetic chain stays broken where it was
        p = qbm("check", "--chain", "--output=json", new_top, ok=(2,))
    return p


def expect_warnings(p, words):
    """Each of words appears in a warning on stderr; nothing else."""
    lines = [l for l in p.stderr.splitlines() if l]
    for w in words:
        if not any("warning" in l and w in l for l in lines):
            raise Fail("no warning with %r:\n%s" % (w, p.stderr))
    if len(lines) != len(words):
        raise Fail("warnings %s, want one for each of %s" % (lines, words))


# ---------------------------------------------------------------------------
# vdsm's tests/storage/bitmaps_test.py (fixture vol_chain: base <- top)

def vdsm_merge_only_valid(qbm, tmp):
    """test_merge_only_valid_bitmaps: the top's disabled bitmap is not
    merged into the base; the valid one is."""
    base, top = build(qbm, tmp, [["+bitmap", "w"],
                                 ["+disabled:off", "+bitmap", "w"]])[::-1]
    want = merge_extents(dirty_map(base, "bitmap") + dirty_map(top,
                                                               "bitmap"))
    p = qbm("commit-bitmaps", top, base)
    expect_warnings(p, ["'disabled'"])
    if qemu_bitmaps(base) != {"bitmap": (65536, ["auto"])}:
        raise Fail("base bitmaps %s" % qemu_bitmaps(base))
    if dirty_map(base, "bitmap") != want:
        raise Fail("base's bitmap is not base | top")
    qemu_img_check(base)


def vdsm_no_bitmaps_to_merge(qbm, tmp):
    """test_no_bitmaps_to_merge."""
    base, top = build(qbm, tmp, [["w"], ["w"]])[::-1]
    before = open(base, "rb").read()
    p = qbm("commit-bitmaps", top, base)
    if p.stderr or qemu_bitmaps(base) or open(base, "rb").read() != before:
        raise Fail("the base changed: %s %s" % (qemu_bitmaps(base),
                                                 p.stderr))


def vdsm_skip_holes(qbm, tmp):
    """test_skip_holes_during_merge_bitmaps: parent <- base <- top, the
    base lacks the bitmap the others have: not added to the base."""
    top, base, parent = build(qbm, tmp, [["+bitmap", "w"], ["w"],
                                         ["+bitmap", "w"]])
    p = qbm("commit-bitmaps", top, base)
    expect_warnings(p, ["%s lacks it" % base])
    if qemu_bitmaps(base):
        raise Fail("base bitmaps %s" % qemu_bitmaps(base))
    qbm("check", "--chain", top, ok=(2,))


def vdsm_merge_skips_in_use(qbm, tmp):
    """vdsm merges only valid bitmaps (_valid: recording, not in use), as
    in test_prune_in_use_bitmaps' chain: bitmaps left in use by a crash of
    the top are skipped with a warning, the valid one merged."""
    names = ["in-use-bitmap-%d" % i for i in range(3)]
    base, top = build(qbm, tmp, [
        ["+" + n for n in names] + ["+valid-bitmap", "w"],
        ["+" + n for n in names] + ["w", "crash", "+valid-bitmap", "w"]
    ])[::-1]
    keep = {n: dirty_map(base, n) for n in names}
    want = merge_extents(dirty_map(base, "valid-bitmap") +
                         dirty_map(top, "valid-bitmap"))
    p = qbm("commit-bitmaps", "-n", top, base)
    for n in names:
        if "would not carry bitmap '%s': %s's copy is in use" % (
                n, top) not in p.stdout:
            raise Fail("dry run does not list %s:\n%s" % (n, p.stdout))
    p = qbm("commit-bitmaps", top, base)
    expect_warnings(p, ["'%s'" % n for n in names])
    if dirty_map(base, "valid-bitmap") != want:
        raise Fail("valid-bitmap is not base | top")
    for n in names:
        if qemu_bitmaps(base)[n] != (65536, ["auto"]) or \
                dirty_map(base, n) != keep[n]:
            raise Fail("base's %s changed" % n)
    qemu_img_check(base)


def vdsm_add_only_valid(qbm, tmp):
    """test_add_only_valid_bitmaps (vdsm's add_bitmaps, libvirt's
    propagation): a new layer gets only the recording, consistent bitmaps;
    an in-use one is skipped with a warning, and the base keeps its own
    as they were (recording)."""
    base, top = build(qbm, tmp, [["+bitmap", "+disabled:off", "+busy", "w",
                                  "!busy"], ["w"]])[::-1]
    before = qemu_bitmaps(base)
    p = qbm("snapshot-bitmaps", "-n", base, top)
    if "not carrying bitmap 'busy': in use in %s" % base not in p.stdout:
        raise Fail("dry run does not list busy:\n" + p.stdout)
    p = qbm("snapshot-bitmaps", base, top)
    expect_warnings(p, ["'busy'"])
    if qemu_bitmaps(top) != {"bitmap": (65536, ["auto"])}:
        raise Fail("top bitmaps %s" % qemu_bitmaps(top))
    if qemu_bitmaps(base) != before:
        raise Fail("base bitmaps %s, were %s" % (qemu_bitmaps(base), before))
    qemu_img_check(top)


# ---------------------------------------------------------------------------
# libvirt's external snapshot (qemuSnapshotDiskBitmapsPropagate)

def snapshot_propagation(qbm, tmp):
    """The history of bitmap/snapshots.json with every snapshot taken
    without bitmap handling and repaired by snapshot-bitmaps gives the
    chain libvirt's propagation gives: the same bitmaps in each layer,
    every copy recording (the base's stay enabled), and each copy marking
    what libvirt's does (the writes are whole bitmap clusters)."""
    os.mkdir(os.path.join(tmp, "qbm"))
    os.mkdir(os.path.join(tmp, "libvirt"))
    ours = build(qbm, os.path.join(tmp, "qbm"), SNAPSHOTS_BY_QBM)
    theirs = build(qbm, os.path.join(tmp, "libvirt"), SNAPSHOTS)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        same_bitmaps(a, b, "L%d" % (k + 1))
        qemu_img_check(a)
    if any(libvirt_rule(ours[0]).values()):
        raise Fail("libvirt's rule finds %s" % libvirt_rule(ours[0]))
    qbm("check", "--chain", ours[0])


# ---------------------------------------------------------------------------
# extract --rotate

def rotate(qbm, tmp, disable_old):
    """libvirt keeps every checkpoint's bitmap recording: after --rotate
    the old bitmap stays enabled (with --disable-old it is disabled, the
    older model), the new one is empty and enabled, and the chain passes
    libvirt's rule only in the first case."""
    (disk,) = build(qbm, tmp, [["w", "+ck0", "w", "w"]])
    before = dirty_map(disk, "ck0")
    inc = os.path.join(tmp, "inc.qcow2")
    qbm("extract", "--rotate", "ck1", *(["--disable-old"] if disable_old
                                        else []), "-o", inc, disk, "ck0")
    qemu_img_check(inc)
    want = {"ck0": (65536, [] if disable_old else ["auto"]),
            "ck1": (65536, ["auto"])}
    if qemu_bitmaps(disk) != want:
        raise Fail("bitmaps %s, want %s" % (qemu_bitmaps(disk), want))
    if dirty_map(disk, "ck1") or dirty_map(disk, "ck0") != before:
        raise Fail("rotation changed the bitmaps' contents")
    qbm("check", "--chain", disk, ok=(2,) if disable_old else (0,))
    # QEMU records the next writes in both, unless disabled.
    qemu_io(disk, "write -P 3 %d 64k" % (20 * SLOT))
    if (dirty_map(disk, "ck0") == before) != disable_old or \
            not dirty_map(disk, "ck1"):
        raise Fail("QEMU's recording after the rotation is wrong")


def rotate_name_taken(qbm, tmp):
    """--rotate NEW where IMAGE has NEW already is refused before the
    backup is written: no OUTPUT, the image unchanged."""
    (disk,) = build(qbm, tmp, [["+ck0", "w", "+ck1"]])
    inc = os.path.join(tmp, "inc.qcow2")
    before = open(disk, "rb").read()
    p = qbm("extract", "--rotate", "ck1", "-o", inc, disk, "ck0", ok=(1,))
    if os.path.exists(inc) or open(disk, "rb").read() != before:
        raise Fail("the refused rotation wrote something")
    if disk not in p.stderr or "'ck1' already exists" not in p.stderr:
        raise Fail("unclear message: %s" % p.stderr)
    if os.listdir(tmp) != ["L1.qcow2"]:
        raise Fail("files left: %s" % os.listdir(tmp))


def main():
    suite = Suite("libvirt-carry", __doc__)
    suite.start()
    q = suite.qbm
    for case in COMMIT_CASES:
        suite.case("libvirt bitmapblockcommit/%s" % case[0],
                   lambda tmp, c=case: commit_case(q, tmp, *c[1:]))
    for label, fn in [
            ("vdsm test_merge_only_valid_bitmaps", vdsm_merge_only_valid),
            ("vdsm test_no_bitmaps_to_merge", vdsm_no_bitmaps_to_merge),
            ("vdsm test_skip_holes_during_merge_bitmaps", vdsm_skip_holes),
            ("vdsm merge skips in-use bitmaps", vdsm_merge_skips_in_use),
            ("vdsm test_add_only_valid_bitmaps, in use",
             vdsm_add_only_valid),
            ("libvirt snapshot propagation (bitmap/snapshots.json)",
             snapshot_propagation),
            ("extract --rotate keeps the old bitmap",
             lambda qbm, tmp: rotate(qbm, tmp, False)),
            ("extract --rotate --disable-old",
             lambda qbm, tmp: rotate(qbm, tmp, True)),
            ("extract --rotate to a name taken", rotate_name_taken)]:
        suite.case(label, lambda tmp, f=fn: f(q, tmp))
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
