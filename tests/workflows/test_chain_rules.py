#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""`qbm check --chain` against libvirt's checkpoint rule, table-driven.

The chain shapes are those of libvirt's bitmap detection test data
(tests/qemublocktestdata/bitmap/*.json with the expectations of
testQemuBlockBitmapValidate) and of vdsm's tests/storage/bitmaps_test.py,
as docs/checkpoint-rules.md lists them. Each chain is built with qemu-img
(a crash with qemu-io's abort, or the in_use flag patched in the file where
only one bitmap of an image must be in use); the expected findings are
written out by hand, and a second oracle derives them from the flags QEMU
reports (qemu-img info --backing-chain) with libvirt's rule, R1 to R4: the
top layer has the bitmap, the layers that have it follow each other from the
top, every copy is recording and not in use.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (MiB, Fail, Suite, qemu_bitmaps,  # noqa: E402
                     qemu_img, qemu_img_create, qemu_img_info, qemu_io,
                     set_bitmap_in_use)

# Each layer, top first, is a list of bitmaps: "name", "name:off"
# (disabled), "name:in-use" (the in_use flag patched in), or "!crash": the
# layer is written by qemu-io, which then aborts, leaving every bitmap added
# so far in use (those listed after it are added after the crash). op:
# a qbm command run before the check (TOP, BASE: the first two layers).
# want: {bitmap: [(rule, layer), ...]}, bitmaps not listed break no rule.
CASES = [
    # libvirt: one layer, no bitmaps ("a" absent: nothing to judge here;
    # see test_checkpoints.py for a checkpoint naming it).
    ("libvirt empty", [[]], None, {}),
    ("libvirt basic", [["a", "b", "c", "d", "current"], [], [], [], []],
     None, {}),
    ("libvirt snapshots",
     [["a", "b", "c", "d", "current"], ["a", "b", "c", "d"],
      ["a", "b", "c"], ["a"], ["a"]], None, {}),
    # Transient bitmaps (top-transient, top-transient-inactive, b of L3)
    # cannot be stored in an image: they are absent here, as from any
    # image libvirt reads offline. L1 is a v2 image in libvirt's data,
    # which cannot hold bitmaps at all: v3 here.
    ("libvirt synthetic",
     [["current:in-use", "top-ok", "top-inactive:off"], ["d"],
      ["c:off", "d"], [], ["a"]], None,
     {"a": [("not-in-top", 0), ("not-in-top", 1), ("not-in-top", 2),
            ("not-in-top", 3)],
      "c": [("not-in-top", 0), ("not-in-top", 1), ("disabled", 2)],
      "d": [("not-in-top", 0)],
      "current": [("in-use", 0)],
      "top-inactive": [("disabled", 0)]}),
    # vdsm test_add_only_valid_bitmaps: only the recording bitmap goes to
    # the new layer; the disabled one is then not in the top, and disabled.
    ("vdsm add only valid bitmaps", [[], ["bitmap", "disabled:off"]],
     ["snapshot-bitmaps", "BASE", "TOP"],
     {"disabled": [("not-in-top", 0), ("disabled", 1)]}),
    ("vdsm no bitmaps to add", [[], []],
     ["snapshot-bitmaps", "BASE", "TOP"], {}),
    # vdsm test_merge_only_valid_bitmaps, the chain before the merge.
    ("vdsm merge only valid bitmaps", [["disabled:off", "bitmap"],
                                       ["bitmap"]], None,
     {"disabled": [("disabled", 0)]}),
    ("vdsm no bitmaps to merge", [[], []], None, {}),
    # vdsm test_skip_holes_during_merge_bitmaps: parent <- base <- top.
    ("vdsm skip holes", [["bitmap"], [], ["bitmap"]], None,
     {"bitmap": [("gap", 1)]}),
    # vdsm test_prune_stale_bitmaps: the stale ones exist in the top only.
    ("vdsm prune stale bitmaps",
     [["valid-bitmap"] + ["stale-bitmap-%d" % i for i in range(5)],
      ["valid-bitmap"]], None, {}),
    ("vdsm prune disabled bitmaps",
     [["valid-bitmap"] + ["disabled-bitmap-%d:off" % i for i in range(5)],
      ["valid-bitmap"] + ["disabled-bitmap-%d" % i for i in range(5)]],
     None, {"disabled-bitmap-%d" % i: [("disabled", 0)] for i in range(5)}),
    ("vdsm prune in-use bitmaps",
     [["in-use-bitmap-%d" % i for i in range(5)] + ["!crash",
                                                   "valid-bitmap"],
      ["in-use-bitmap-%d" % i for i in range(5)] + ["valid-bitmap"]],
     None, {"in-use-bitmap-%d" % i: [("in-use", 0)] for i in range(5)}),
    # libvirt's rule where the old qbm rule differed: a copy disabled in a
    # backing layer, and a disabled bitmap in the top alone.
    ("disabled in a backing layer", [["ck"], ["ck:off"], ["ck"]], None,
     {"ck": [("disabled", 1)]}),
    ("disabled in the top alone", [["ck:off"], []], None,
     {"ck": [("disabled", 0)]}),
    ("in use in a backing layer, run ends above the bottom",
     [["ck"], ["ck:in-use"], []], None, {"ck": [("in-use", 1)]}),
    ("frozen below the top", [[], ["ck:off"]], None,
     {"ck": [("not-in-top", 0), ("disabled", 1)]}),
]

RULE_WORDS = {
    "not-in-top": "bitmap '%s' is not in the top layer: missing from "
                  "layer %d",
    "gap": "bitmap '%s' has a gap at layer %d",
    "disabled": "bitmap '%s' is disabled in layer %d",
    "in-use": "bitmap '%s' is in use in layer %d",
}


def build(tmp, layers):
    """The chain l0 (top) <- l1 <- ...; returns the layer paths."""
    paths = [os.path.join(tmp, "l%d.qcow2" % i) for i in range(len(layers))]
    for i in reversed(range(len(layers))):
        qemu_img_create(paths[i], 16 * MiB,
                        backing=(os.path.basename(paths[i + 1])
                                 if i + 1 < len(layers) else None))
        patched = []
        for spec in layers[i]:
            if spec == "!crash":
                qemu_io(paths[i], "write 0 64k", "abort", ok=None)
                continue
            name, _, flag = spec.partition(":")
            qemu_img("bitmap", "--add", *(["--disable"] if flag == "off"
                                          else []), paths[i], name)
            if flag == "in-use":
                patched.append(name)
        for name in patched:
            set_bitmap_in_use(paths[i], name)
    return paths


def libvirt_rule(top):
    """Findings of libvirt's rule from QEMU's view of the chain: {bitmap:
    [(rule, layer), ...]}, layers from the top, rules in qbm's order."""
    chain = qemu_img_info(top, "--backing-chain")
    flags = []
    for layer in chain:
        bms = layer.get("format-specific", {}).get("data", {}).get(
            "bitmaps", [])
        flags.append({b["name"]: b["flags"] for b in bms})
    out = {}
    for name in set().union(*flags):
        deepest = max(i for i, f in enumerate(flags) if name in f)
        found, seen = [], False
        for i in range(deepest + 1):
            if name not in flags[i]:
                found.append(("gap" if seen else "not-in-top", i))
                continue
            seen = True
            if "auto" not in flags[i][name]:
                found.append(("disabled", i))
            if "in-use" in flags[i][name]:
                found.append(("in-use", i))
        if found:
            out[name] = found
    return out


def run_case(qbm, tmp, layers, op, want):
    paths = build(tmp, layers)
    if op:
        qbm(*[{"TOP": paths[0], "BASE": paths[1]}.get(a, a) for a in op])
    oracle = libvirt_rule(paths[0])
    if oracle != want:
        raise Fail("QEMU's flags under libvirt's rule give %s, the table "
                   "%s" % (oracle, want))
    p = qbm("check", "--chain", "--output=json", paths[0], ok=(0, 2))
    got = {}
    for prob in json.loads(p.stdout)[0]["problems"]:
        if "rule" in prob:
            got.setdefault(prob["bitmap"], []).append((prob["rule"],
                                                       prob["layer"]))
    if got != want:
        raise Fail("check --chain found %s, want %s" % (got, want))
    if p.returncode != (2 if want else 0):
        raise Fail("check --chain exit %d" % p.returncode)
    h = qbm("check", "--chain", paths[0], ok=(0, 2))
    for name, found in want.items():
        for rule, layer in found:
            if RULE_WORDS[rule] % (name, layer) not in h.stdout:
                raise Fail("human output lacks %r:\n%s" % (
                    RULE_WORDS[rule] % (name, layer), h.stdout))
    if op and op[0] == "snapshot-bitmaps":
        # vdsm's expectation, judged by QEMU: only valid bitmaps carried.
        carried = qemu_bitmaps(paths[0])
        base = qemu_bitmaps(paths[1])
        valid = {n: (v[0], ["auto"]) for n, v in base.items()
                 if v[1] == ["auto"]}
        if carried != valid:
            raise Fail("top has %s, want %s" % (carried, valid))


def main():
    suite = Suite("chain-rules", __doc__)
    suite.start()
    for name, layers, op, want in CASES:
        suite.case(name, lambda tmp, l=layers, o=op, w=want:
                   run_case(suite.qbm, tmp, l, o, w))
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
