#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""qcow2 images on block devices, and space accounting, judged by QEMU.

Every device is a loop device over a file of the case's temporary
directory, and qbm and QEMU reach it ONLY through a private device node
made with mknod in that directory (never /dev/loopN); it is detached also
when the case fails. Images are made by qemu-img directly on the node.
- basic: info, add, populate, merge, dump, check and remove on a device
  (the size comes from the device, not from fstat); QEMU's check is clean
  and qemu-nbd exports what qbm wrote; `qbm info` reports the image end
  offset qemu-img check reports and the bitmaps' size the layout gives;
  locks work on the node; symbolic links are followed; check --repair
  after a QEMU crash on the device;
- no space: the issue's example (a 6 MiB device, 2 MiB written, a merge of
  a dirty 16 MiB-disk bitmap from another image at 512 B granularity):
  refused with the no-space message, the device byte for byte unchanged,
  qemu-img check clean; --dry-run says the same; `add --dry-run` tells the
  most a new bitmap can need; with -q neither prints its plan;
- free clusters: a device whose image has free clusters below its end
  takes an edit that fits there, and the image end does not move;
- small file system: an image on a tiny tmpfs where the edit cannot fit is
  refused with nothing changed (size and bytes), and one that fits works;
- snapshot-bitmaps: its dry run prints each image's space line (TOP on a
  device, BASE on a file with --disable-base), and the real run ends each
  image where the dry run said, QEMU's check clean; on a device too small
  for TOP's new bitmap the dry run and the real run are refused with the
  no-space message, TOP and BASE byte for byte unchanged;
- differential: the same random edit sequence on a file image and on a
  device image gives the same bitmaps (by qemu-nbd) and the same image end.
Skips (77) when loop devices are unavailable (not root, no losetup),
except under CI.
"""
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (OFFSET_MASK, MiB, Fail, LoopDevice, Qcow2,  # noqa: E402
                     Suite, dirty_map, file_hash, qemu_bitmaps,
                     qemu_image_end, qemu_img, qemu_img_check,
                     qemu_img_create, qemu_io, require_loop, run)


def info(qbm, img):
    return qbm.json("info", img)


def scenario_basic(qbm, tmp):
    with LoopDevice(tmp, 64 * MiB, "dev") as loop:
        dev = loop.node
        qemu_img_create(dev, 256 * MiB)
        qemu_io(dev, "write 0 1M", "write 100M 64k")
        i = info(qbm, dev)
        if i["file-size"] != 64 * MiB:
            raise Fail("info: file-size %s, expected the device size %d" %
                       (i["file-size"], 64 * MiB))
        qbm("add", "-g", "64k", dev, "a")
        qbm("add", "-g", "4k", "--disabled", dev, "b")
        qbm("populate", dev, "a")
        qbm("merge", dev, "b", "a")
        qemu_img_check(dev)
        for name in ("a", "b"):
            got = qbm.dump(dev, name)
            want = dirty_map(dev, name)
            if got != want:
                raise Fail("bitmap %s: qbm dump %s, QEMU exports %s" %
                           (name, got, want))
        if dirty_map(dev, "a") != [(0, 1 * MiB), (100 * MiB, 64 * 1024)]:
            raise Fail("bitmap a exported as %s" % dirty_map(dev, "a"))
        if set(qemu_bitmaps(dev)) != {"a", "b"}:
            raise Fail("QEMU lists %s" % qemu_bitmaps(dev))
        end = qemu_image_end(dev)
        if info(qbm, dev).get("image-end-offset") != end:
            raise Fail("info: image-end-offset %s, qemu-img check says %s" %
                       (info(qbm, dev).get("image-end-offset"), end))
        qbm("check", dev)
        qbm("remove", dev, "b")
        qemu_img_check(dev)
        if set(qemu_bitmaps(dev)) != {"a"}:
            raise Fail("after remove QEMU lists %s" % qemu_bitmaps(dev))
        # QEMU's lock bytes on the node: qemu-io holds it for writing
        # (once it prints its prompt: until then qbm's own read lock
        # could make qemu-io's open fail).
        holder = subprocess.Popen(
            ["qemu-io", "-f", "qcow2", dev], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            prompt = holder.stdout.read(len("qemu-io> "))
            if prompt != b"qemu-io> ":
                raise Fail("qemu-io on the device: %r" % prompt)
            p = qbm("info", dev, ok=None)
            if p.returncode != 1 or "lock" not in p.stderr:
                raise Fail("qbm info while qemu-io holds the device: exit "
                           "%d, %s" % (p.returncode, p.stderr.strip()))
        finally:
            holder.communicate(b"quit\n", timeout=30)
        # A symbolic link to the node is followed.
        link = os.path.join(tmp, "link")
        os.symlink(dev, link)
        if qbm.dump(link, "a") != dirty_map(dev, "a"):
            raise Fail("dump through a symbolic link differs")
        # bitmaps-size: the directory, tables and data clusters, once each.
        q = Qcow2(dev)
        cs = q.cluster_size
        clusters = {q.bitmap_directory_offset // cs + k for k in range(
            (q.bitmap_directory_size + cs - 1) // cs)}
        for e in q.bitmaps:
            clusters |= {e.bitmap_table_offset // cs + k for k in range(
                (e.bitmap_table_size * 8 + cs - 1) // cs)}
            clusters |= {x // cs for x in (y & OFFSET_MASK for y in
                                           q.bitmap_table(e)) if x}
        if info(qbm, dev)["bitmaps-size"] != len(clusters) * cs:
            raise Fail("info: bitmaps-size %d, the layout says %d" % (
                info(qbm, dev)["bitmaps-size"], len(clusters) * cs))
        # A crash (QEMU leaves the bitmap in use and clusters leaked), then
        # check and repair on the device.
        qemu_io(dev, "write 2M 64k", "abort", ok=None)
        qbm("check", dev, ok=(2,))
        qbm("check", "--repair", dev, ok=(0,))
        qemu_img_check(dev)
        if dirty_map(dev, "a") != [(0, 256 * MiB)]:
            raise Fail("repaired bitmap a: %s" % dirty_map(dev, "a"))


def dirty_source(tmp, size):
    """An image of virtual size `size` whose bitmap 'big' (512 B
    granularity) QEMU marked dirty everywhere: size / 4096 bytes of bitmap
    data (16 MiB for 64 GiB)."""
    src = os.path.join(tmp, "src.qcow2")
    qemu_img_create(src, size)
    qemu_img("bitmap", "--add", "-g", "512", src, "big")
    step = 1 << 30
    qemu_io(src, *["write -z %d %d" % (o, min(step, size - o))
                   for o in range(0, size, step)])
    return src


def scenario_no_space(qbm, tmp):
    """The issue's example: a 6 MiB device, 2 MiB written, a merge of a
    16 MiB bitmap from another image."""
    src = dirty_source(tmp, 64 << 30)
    with LoopDevice(tmp, 6 * MiB, "dev") as loop:
        dev = loop.node
        qemu_img_create(dev, 64 << 30)
        qemu_io(dev, "write -P 7 0 2M")
        qbm("add", "-g", "512", dev, "t")
        end = qemu_image_end(dev)
        before = file_hash(dev)
        for dry in ([], ["--dry-run"]):
            p = qbm("merge", *dry, "-b", src, dev, "t", "big", ok=(1,))
            want = ("not enough space on %s: the edit needs %d bytes past "
                    "the image end %d; the device has %d" % (
                        dev, (16 << 20) + 2 * 65536, end, 6 * MiB))
            if want not in p.stderr or p.stdout:
                raise Fail("merge %s: expected '%s', got stdout %r stderr "
                           "%r" % (dry, want, p.stdout, p.stderr))
            if file_hash(dev) != before:
                raise Fail("merge %s: the device changed" % dry)
        qemu_img_check(dev)
        if dirty_map(dev, "t") != []:
            raise Fail("bitmap t is dirty: %s" % dirty_map(dev, "t"))
        # add --dry-run: the most a bitmap can take, before making room.
        p = qbm("add", "--dry-run", "-g", "512", dev, "n")
        if ("at most, once every bit is dirty, it needs %d bytes" %
                ((16 << 20) + 2 * 65536)) not in p.stdout or \
                "(too few)" not in p.stdout:
            raise Fail("add --dry-run: %r" % p.stdout)
        if file_hash(dev) != before:
            raise Fail("add --dry-run changed the device")
        # -q: the plan and its space figures are output like any other
        # (silenced); a refusal still fails with its message.
        for cmd, rc in ((["add", "-g", "512", dev, "n"], 0),
                        (["merge", "-b", src, dev, "t", "big"], 1)):
            p = qbm(cmd[0], "-q", "--dry-run", *cmd[1:], ok=(rc,))
            if p.stdout or (rc and "not enough space on" not in p.stderr):
                raise Fail("%s -q --dry-run: stdout %r, stderr %r" % (
                    cmd[0], p.stdout, p.stderr))
        if file_hash(dev) != before:
            raise Fail("a -q --dry-run changed the device")
        # A merge that fits: the other image's bitmap at 64 KiB granularity
        # (tens of bytes of data).
        qbm("add", dev, "u")
        p = qbm("merge", "--dry-run", "-b", src, dev, "u", "big")
        need = int(p.stdout.split("needs ")[1].split(" ")[0])
        after = int(p.stdout.split("image end after the edit: ")[1]
                    .split(";")[0])
        qbm("merge", "-b", src, dev, "u", "big")
        qemu_img_check(dev)
        if qemu_image_end(dev) != after:
            raise Fail("dry run said image end %d, QEMU says %d after the "
                       "merge" % (after, qemu_image_end(dev)))
        if need != 4 * 65536:
            raise Fail("dry run: needs %d bytes, expected 4 clusters (2 of "
                       "data, a table, a directory)" % need)
        if dirty_map(dev, "u") != [(0, 64 << 30)]:
            raise Fail("bitmap u: %s" % dirty_map(dev, "u"))


def scenario_free_clusters(qbm, tmp):
    """A device that ends at the image end: an edit that fits into the
    free clusters below it works and the image end does not move; one that
    does not fit is refused, the device unchanged."""
    with LoopDevice(tmp, 64 * MiB, "dev") as loop:
        dev = loop.node
        qemu_img_create(dev, 4 << 30, opts="cluster_size=4096")
        qemu_io(dev, *["write %d 64k" % (i << 29) for i in range(8)])
        qbm("add", "-g", "512", dev, "old")    # 8 data clusters, a table
        qbm("populate", dev, "old")
        qbm("add", "-g", "64k", dev, "keep")   # 2 data clusters, a table
        qbm("populate", dev, "keep")
        qbm("remove", dev, "old")
        qemu_img_check(dev)
        end = qemu_image_end(dev)
        loop.resize(end)
        qbm("add", "-g", "64k", dev, "new")
        qbm("populate", dev, "new")            # 4 clusters with the directory
        qemu_img_check(dev)
        if qemu_image_end(dev) != end:
            raise Fail("image end moved from %d to %d" %
                       (end, qemu_image_end(dev)))
        for name in ("keep", "new"):
            if qbm.dump(dev, name) != dirty_map(dev, name):
                raise Fail("bitmap %s differs from QEMU's view" % name)
        qbm("add", "-g", "512", dev, "more")
        before = file_hash(dev)
        p = qbm("populate", dev, "more", ok=(1,))  # 10 clusters: too many
        if "not enough space on %s" % dev not in p.stderr:
            raise Fail("populate on a full device: %s" % p.stderr.strip())
        if file_hash(dev) != before:
            raise Fail("the refused populate changed the device")
        qemu_img_check(dev)


def scenario_small_fs(qbm, tmp):
    """An image on a tiny tmpfs: an edit that cannot fit is refused with
    the file unchanged (bytes and size); one that fits works."""
    src = dirty_source(tmp, 64 << 30)
    mnt = os.path.join(tmp, "mnt")
    os.mkdir(mnt)
    run(["mount", "-t", "tmpfs", "-o", "size=6m", "qbm-test", mnt])
    try:
        img = os.path.join(mnt, "img.qcow2")
        qemu_img_create(img, 64 << 30)
        qemu_io(img, "write -P 7 0 2M")
        qbm("add", "-g", "512", img, "t")
        qbm("add", img, "u")
        size, before = os.path.getsize(img), file_hash(img)
        p = qbm("merge", "-b", src, img, "t", "big", ok=(1,))
        if "not enough space for" not in p.stderr or \
                "the image was not changed" not in p.stderr:
            raise Fail("merge on a full file system: %s" % p.stderr.strip())
        if os.path.getsize(img) != size or file_hash(img) != before:
            raise Fail("the refused merge changed the file (size %d -> %d)"
                       % (size, os.path.getsize(img)))
        qemu_img_check(img)
        qbm("merge", "-b", src, img, "u", "big")
        qemu_img_check(img)
        if dirty_map(img, "u") != [(0, 64 << 30)] or dirty_map(img, "t"):
            raise Fail("bitmaps after the merge that fits: u %s, t %s" %
                       (dirty_map(img, "u"), dirty_map(img, "t")))
    finally:
        run(["umount", mnt], ok=None)


def scenario_dry_run_checks(qbm, tmp):
    """--dry-run refuses what the edit refuses: here a cluster 0 with no
    room left for the bitmaps extension (512 B clusters, a 360-byte
    backing name)."""
    img = os.path.join(tmp, "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-o", "cluster_size=512",
             "-b", "b" * 354 + ".qcow2", "-F", "qcow2", img, "16M")
    real = qbm("add", img, "x", ok=None)
    dry = qbm("add", "--dry-run", img, "x", ok=None)
    if real.returncode == 0:
        raise Fail("the real add worked: the image is not what the test "
                   "needs")
    if dry.returncode != real.returncode or dry.stdout:
        raise Fail("add --dry-run: exit %d, stdout %r; the real add: exit "
                   "%d, %s" % (dry.returncode, dry.stdout, real.returncode,
                               real.stderr.strip()))


def space_lines(out):
    """(needed, past the end, image end, image end after) of each space
    line of a dry run's output, in order."""
    lines = []
    for ln in out.splitlines():
        if ln.startswith("needs "):
            w = ln.replace("(", " ").replace(";", " ").replace(")", " ")
            w = w.split()
            lines.append((int(w[1]), int(w[6]), int(w[11]), int(w[17])))
    return lines


def scenario_snapshot_space(qbm, tmp):
    """snapshot-bitmaps --dry-run tells the space each commit needs, the
    real run takes that much; a device too small refuses both. TOP: a
    4 GiB disk QEMU zeroed everywhere on a device, so TOP's copy of the
    512 B granularity bitmap is all dirty (1 MiB of data)."""
    base = os.path.join(tmp, "base.qcow2")
    qemu_img_create(base, 4 << 30)
    qemu_img("bitmap", "--add", "-g", "512", base, "ck")

    def make_top(dev):
        qemu_img_create(dev, 4 << 30, backing=base)
        qemu_io(dev, *["write -z %d %d" % (o << 30, 1 << 30)
                       for o in range(4)])

    with LoopDevice(tmp, 8 * MiB, "dev") as loop:
        dev = loop.node
        make_top(dev)
        p = qbm("snapshot-bitmaps", "--dry-run", "--disable-base", base, dev)
        sp = space_lines(p.stdout)
        if len(sp) != 2 or "the device has %d bytes\n" % (8 * MiB) not in \
                p.stdout:
            raise Fail("dry run: no space line for each image: %r" %
                       p.stdout)
        (_, top_past, top_end, top_after), (_, _, base_end, base_after) = sp
        if top_end != qemu_image_end(dev) or \
                base_end != qemu_image_end(base):
            raise Fail("dry run: image ends %d and %d, QEMU says %d and %d"
                       % (top_end, base_end, qemu_image_end(dev),
                          qemu_image_end(base)))
        # More than the bitmap's 1 MiB of data: the real run must need it.
        if top_past < MiB:
            raise Fail("dry run: TOP needs %d bytes past its end" % top_past)
        qbm("snapshot-bitmaps", "--disable-base", base, dev)
        qemu_img_check(dev)
        qemu_img_check(base)
        if qemu_image_end(dev) != top_after:
            raise Fail("TOP: the dry run said image end %d, QEMU says %d"
                       % (top_after, qemu_image_end(dev)))
        # BASE's old directory is freed after the switch: when it was the
        # last cluster, the image ends below the figure, the file does not.
        if not qemu_image_end(base) <= base_after <= \
                os.path.getsize(base):
            raise Fail("BASE: the dry run said image end %d, QEMU says %d, "
                       "the file has %d bytes" % (base_after,
                                                  qemu_image_end(base),
                                                  os.path.getsize(base)))
        if dirty_map(dev, "ck") != [(0, 4 << 30)]:
            raise Fail("TOP's ck: %s" % dirty_map(dev, "ck"))
        if qemu_bitmaps(base)["ck"][1] != []:
            raise Fail("BASE's ck: %s" % (qemu_bitmaps(base)["ck"],))
    qemu_img("bitmap", "--enable", base, "ck")
    # The same TOP on a device that ends before the new bitmap would.
    small = (top_end + top_past // 2) // 512 * 512
    with LoopDevice(tmp, small, "small") as loop:
        dev = loop.node
        make_top(dev)
        before, base_before = file_hash(dev), file_hash(base)
        want = ("not enough space on %s: the edit needs %d bytes past the "
                "image end %d; the device has %d" % (dev, top_past, top_end,
                                                     small))
        for dry in ([], ["--dry-run"]):
            p = qbm("snapshot-bitmaps", *dry, "--disable-base", base, dev,
                    ok=(1,))
            if want not in p.stderr or p.stdout:
                raise Fail("snapshot-bitmaps %s: expected '%s', got stdout "
                           "%r stderr %r" % (dry, want, p.stdout, p.stderr))
            if file_hash(dev) != before or file_hash(base) != base_before:
                raise Fail("snapshot-bitmaps %s: an image changed" % dry)
        qemu_img_check(dev)
        if "ck" in qemu_bitmaps(dev):
            raise Fail("the refused run left TOP a bitmap")


def random_edits(rng, n):
    """n random edits as argument lists for qbm (IMAGE stands for the
    image), with qemu-io writes between them."""
    names, out = [], []
    for _ in range(n):
        k = rng.randrange(8)
        if k == 0 or len(names) < 2:
            name = "b%d" % rng.randrange(1000)
            if name in names:
                continue
            g = rng.choice(["512", "4k", "64k", "1M"])
            out.append(("qbm", ["add", "-g", g, "IMAGE", name]))
            names.append(name)
        elif k == 1:
            out.append(("qbm", ["remove", "IMAGE", names.pop(
                rng.randrange(len(names)))]))
        elif k == 2:
            out.append(("qbm", ["clear", "IMAGE", rng.choice(names)]))
        elif k == 3:
            a, b = rng.sample(names, 2)
            out.append(("qbm", ["merge", "IMAGE", a, b]))
        elif k == 4:
            out.append(("qbm", [rng.choice(["enable", "disable"]), "IMAGE",
                                rng.choice(names)]))
        elif k == 5:
            off = rng.randrange(0, 256) << 20
            # Within the 256 MiB disk: QEMU refuses a write past its end.
            length = min(rng.randrange(1, 64) << 16, (256 << 20) - off)
            out.append(("io", "write %d %d" % (off, length)))
        else:
            out.append(("qbm", ["populate", "IMAGE", rng.choice(names)]))
    return out


def scenario_differential(qbm, tmp, rng):
    """The same edits on a file image and on a device image."""
    # Room for the largest sequence (30 writes of up to 4 MiB).
    with LoopDevice(tmp, 192 * MiB, "dev") as loop:
        dev = loop.node
        f = os.path.join(tmp, "file.qcow2")
        for img in (f, dev):
            qemu_img_create(img, 256 * MiB, opts="cluster_size=4096")
        for kind, what in random_edits(rng, 30):
            for img in (f, dev):
                if kind == "io":
                    qemu_io(img, what)
                else:
                    qbm(*[img if a == "IMAGE" else a for a in what])
        for img in (f, dev):
            qemu_img_check(img)
        bf, bd = qemu_bitmaps(f), qemu_bitmaps(dev)
        if bf != bd:
            raise Fail("bitmaps differ: file %s, device %s" % (bf, bd))
        for name in bf:
            if dirty_map(f, name) != dirty_map(dev, name):
                raise Fail("bitmap %s differs: file %s, device %s" % (
                    name, dirty_map(f, name), dirty_map(dev, name)))
        if qemu_image_end(f) != qemu_image_end(dev):
            raise Fail("image ends differ: file %d, device %d" % (
                qemu_image_end(f), qemu_image_end(dev)))
        if info(qbm, dev)["image-end-offset"] != qemu_image_end(dev):
            raise Fail("qbm info's image end differs from QEMU's")


def main():
    suite = Suite("blockdev", __doc__, seeded=True)
    suite.parser.add_argument("--rounds", type=int, default=3,
                              help="random differential rounds")
    args = suite.start()
    require_loop()
    for fn in (scenario_basic, scenario_no_space, scenario_free_clusters,
               scenario_small_fs, scenario_dry_run_checks,
               scenario_snapshot_space):
        suite.case(fn.__name__, lambda tmp: fn(suite.qbm, tmp))
    for i in range(args.rounds):
        suite.case("differential round %d" % i,
                   lambda tmp: scenario_differential(suite.qbm, tmp,
                                                     suite.rng(i)), index=i)
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
