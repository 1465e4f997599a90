#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Messages that say what to do next (issue 14 item 3).

- `check -r all|leaks` lists every repair it made: in-use bitmaps made all
  dirty (the next incremental from each is a full copy) or removed, a stale
  extension dropped, leaked clusters freed; in JSON as "repairs"; QEMU
  judges the result;
- `dump` of a bitmap only a backing layer has points to `--chain`;
- `commit-bitmaps` and `snapshot-bitmaps` with BASE and TOP swapped say
  so and give the command to run;
- `extract` and `restore` take `-U` (read an image a QEMU writer holds, as
  qemu-img -U), which their lock error advises; not with what edits
  (`--rotate`, `--link`);
- `extract --rotate NEW` with NEW taken refuses before OUTPUT is written.
"""
import json
import os
import shutil
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (OFFSET_MASK, Fail, MiB, Qcow2, Suite,  # noqa: E402
                     qemu_bitmaps, qemu_img, qemu_img_check,
                     qemu_img_compare, qemu_img_create, qemu_image_end,
                     qemu_io, qemu_io_holding, set_bitmap_in_use)

SIZE = 16 * MiB
FULL_COPY = "was in use, now all dirty: the next incremental from it " \
            "will be a full copy"


def expect(cond, what):
    if not cond:
        raise Fail(what)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def image(tmp, name, bitmaps=(), backing=None):
    img = os.path.join(tmp, name)
    qemu_img_create(img, SIZE, backing=backing)
    for b in bitmaps:
        qemu_img("bitmap", "--add", img, b)
    qemu_io(img, "write 1M 64k")
    return img


def add_leak(img):
    """Grow the file by two clusters, the first with refcount 1 and no
    reference (a crash between a refcount update and its use)."""
    q = Qcow2(img)
    block = q.refcount_table()[0] & OFFSET_MASK
    cluster = -(-os.path.getsize(img) // q.cluster_size)
    with open(img, "r+b") as f:
        f.truncate((cluster + 2) * q.cluster_size)
        f.seek(block + 2 * cluster)
        f.write(struct.pack(">H", 1))
    qemu_img_check(img, ok=(3,))


def case_repair_lists(qbm, tmp):
    """Four in-use bitmaps and a leak: each repair is listed (human and
    JSON), then the report of the repaired image; QEMU finds it clean."""
    names = ["b0", "b1", "b2", "b3"]
    orig = image(tmp, "orig.qcow2", names)
    for n in names:
        set_bitmap_in_use(orig, n)
    add_leak(orig)
    a, b = os.path.join(tmp, "a.qcow2"), os.path.join(tmp, "b.qcow2")
    shutil.copyfile(orig, a)
    shutil.copyfile(orig, b)
    p = qbm("check", "-r", "all", a)
    lines = p.stdout.splitlines()
    for n in names:
        expect("Repaired: bitmap '%s': %s" % (n, FULL_COPY) in lines,
               "no repair line for %s:\n%s" % (n, p.stdout))
    expect(any(x.startswith("Repaired: 1 leaked cluster(s) freed")
               for x in lines), "no leak repair line:\n" + p.stdout)
    # The report of the repaired image, ending as qemu-img check's.
    expect(lines[-2:] == ["No problems were found.",
                          "Image end offset: %d" % qemu_image_end(a)],
           p.stdout)
    qemu_img_check(a)
    expect(all(qemu_bitmaps(a)[n][1] == ["auto"] for n in names),
           "bitmaps still in use")
    r = json.loads(qbm("check", "--repair=all", "--output=json",
                       b).stdout)
    acts = [(x["action"], x.get("bitmap")) for x in r["repairs"]]
    expect(acts == [("in-use-dirty", n) for n in names] + [("leaks", None)],
           "JSON repairs: %s" % r["repairs"])
    expect(r["repairs"][-1]["clusters"] == 1, "leak count %s" % r)
    expect(r.get("image-end-offset") == qemu_image_end(b),
           "JSON image-end-offset: %s" % r)
    expect(read(a) == read(b), "human and JSON repairs differ")
    # Nothing to repair: nothing listed.
    p = qbm("check", "-r", "all", a)
    expect("Repaired" not in p.stdout, "a clean image: " + p.stdout)


def case_repair_remove_and_leaks(qbm, tmp):
    """--in-use=remove says the checkpoint is gone; -r leaks lists only
    the leak and leaves the in-use bitmap (reported, exit 2)."""
    orig = image(tmp, "orig.qcow2", ["ck"])
    set_bitmap_in_use(orig, "ck")
    add_leak(orig)
    a = os.path.join(tmp, "a.qcow2")
    shutil.copyfile(orig, a)
    p = qbm("check", "-r", "all", "--in-use=remove", a)
    expect("Repaired: bitmap 'ck': was in use, now removed" in p.stdout,
           p.stdout)
    expect(qemu_bitmaps(a) == {}, "ck not removed")
    qemu_img_check(a)
    shutil.copyfile(orig, a)
    p = qbm("check", "-r", "leaks", a, ok=(2,))
    expect("Repaired: 1 leaked cluster(s) freed" in p.stdout and
           "bitmap 'ck'" not in p.stdout.split("Repaired: 1")[0],
           p.stdout)
    expect("in-use" in qemu_bitmaps(a)["ck"][1], "-r leaks repaired ck")


def case_repair_stale(qbm, tmp):
    """A stale extension (autoclear bit cleared by an older program):
    dropped, said so, and its clusters freed as leaks."""
    img = image(tmp, "a.qcow2", ["ck"])
    with open(img, "r+b") as f:
        f.seek(88)
        word = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", word & ~1))
    p = qbm("check", "-r", "all", img)
    expect("Repaired: stale bitmaps extension dropped" in p.stdout, p.stdout)
    expect("leaked cluster(s) freed" in p.stdout, p.stdout)
    qemu_img_check(img)


def case_dump_chain_hint(qbm, tmp):
    """A bitmap only the backing layer has: the error names the layer and
    --chain, which works."""
    base = image(tmp, "base.qcow2", ["ck"])
    top = image(tmp, "top.qcow2", backing="base.qcow2")
    p = qbm("dump", top, "ck", ok=(1,))
    expect("'qbm dump --chain'" in p.stderr and base in p.stderr and
           not p.stdout, "dump: %r" % p.stderr)
    p = qbm("dump", top, "nope", ok=(1,))
    expect("--chain" not in p.stderr, "a bitmap nowhere: %r" % p.stderr)
    qbm("dump", "--chain", top, "ck")


def case_swapped(qbm, tmp):
    """BASE and TOP the wrong way round: the hint gives the command."""
    image(tmp, "base.qcow2", ["ck"])
    image(tmp, "top.qcow2", backing="base.qcow2")
    os.chdir(tmp)
    before = read("base.qcow2"), read("top.qcow2")
    p = qbm("commit-bitmaps", "base.qcow2", "top.qcow2", ok=(1,))
    expect("BASE is above TOP" in p.stderr and
           "did you mean 'qbm commit-bitmaps top.qcow2 base.qcow2'?"
           in p.stderr, "commit-bitmaps: %r" % p.stderr)
    p = qbm("snapshot-bitmaps", "top.qcow2", "base.qcow2", ok=(1,))
    expect("BASE is above TOP" in p.stderr and
           "did you mean 'qbm snapshot-bitmaps base.qcow2 top.qcow2'?"
           in p.stderr, "snapshot-bitmaps: %r" % p.stderr)
    expect((read("base.qcow2"), read("top.qcow2")) == before,
           "a refused command changed an image")
    # The right order gets no hint.
    p = qbm("commit-bitmaps", "top.qcow2", "base.qcow2")
    expect("did you mean" not in p.stderr, p.stderr)


def case_force_share(qbm, tmp):
    """An image a QEMU writer holds: extract and restore refuse it and
    advise -U; with -U they read it (the output is the disk QEMU sees)."""
    img = image(tmp, "a.qcow2", ["ck"])
    out = os.path.join(tmp, "x.qcow2")
    raw = os.path.join(tmp, "r.raw")
    with qemu_io_holding(img):
        p = qbm("extract", "--full", "-o", out, img, ok=(1,))
        expect("use -U" in p.stderr and not os.path.exists(out), p.stderr)
        p = qbm("restore", "-o", raw, img, ok=(1,))
        expect("use -U" in p.stderr and not os.path.exists(raw), p.stderr)
        qbm("extract", "--full", "-U", "-o", out, img)
        qbm("restore", "-o", raw, img, "-U")
        qemu_img_compare(img, out, "-U")
        qemu_img_compare(img, raw, "-U")
        p = qbm("extract", "-U", "--rotate", "ck2", "-o", out, img, "ck",
                ok=(2,))
        expect("--rotate cannot be used with -U" in p.stderr, p.stderr)
    p = qbm("restore", "--link", "-U", out, img, ok=(2,))
    expect("--link cannot be used with -U" in p.stderr, p.stderr)


def case_rotate_clash_first(qbm, tmp):
    """--rotate NEW with NEW taken: refused before OUTPUT is written, the
    image unchanged byte for byte."""
    img = image(tmp, "a.qcow2", ["ck", "ck2"])
    out = os.path.join(tmp, "x.qcow2")
    before = read(img)
    p = qbm("extract", "--rotate", "ck2", "-o", out, img, "ck", ok=(1,))
    expect("cannot start checkpoint 'ck2'" in p.stderr and
           "already exists" in p.stderr, p.stderr)
    expect(not os.path.exists(out), "OUTPUT was written")
    expect(read(img) == before, "the image changed")
    expect(os.listdir(tmp) == ["a.qcow2"], "left %s" % os.listdir(tmp))


def main():
    suite = Suite("hints", __doc__)
    suite.start()
    suite.qbm.path = os.path.abspath(suite.qbm.path)
    cwd = os.getcwd()
    for fn in (case_repair_lists, case_repair_remove_and_leaks,
               case_repair_stale, case_dump_chain_hint, case_swapped,
               case_force_share, case_rotate_clash_first):
        suite.case(fn.__name__, lambda tmp, fn=fn: fn(suite.qbm, tmp))
        os.chdir(cwd)
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
