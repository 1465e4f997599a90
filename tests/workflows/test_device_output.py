#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""restore and extract onto block devices (issue 13 item 3).

Each case makes loop devices over files of random garbage in its own
directory and runs qbm only on private nodes made there with mknod (same
major and minor), never on /dev/loopN; the devices are detached also on
failure. Without a loop device (no losetup, not root) the suite is skipped
(exit 77), except under CI.

- restore writes the disk in place: a full backup and two incrementals
  (compressed clusters, zero flags, discards among them) onto a device of
  the virtual size and onto a larger one, in turn over what the previous
  restore left; every byte of the virtual disk is data or zeros (QEMU
  compares the device with the disk, and it equals a restore into a file
  byte for byte); a larger device keeps its bytes past the virtual size.
  Unaligned ranges (512-byte clusters, a raw full backup of an odd size),
  also onto a device with 4 KiB sectors.
- restore -O qcow2 and extract write a qcow2 image onto the device:
  qemu-img check is clean and compare finds the disk; the device's bytes up
  to the image end are those of the same output written to a file; a
  device of exactly the image end (qemu-img check's figure) is enough,
  512 bytes less is refused.
- Refused, the device byte for byte unchanged: smaller than the output,
  in use (held O_EXCL, or open in QEMU), the same device as an input
  (another node of it), restore --checkpoint onto a device.
- -p shows progress up to 100 %; a symbolic link to the node is followed
  and stays.
- A failure while a qcow2 image is written onto a device that held one
  (a corrupt compressed cluster in the input) leaves no qcow2 header: the
  old one is cleared first, the new one written last.
"""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (MiB, OFFSET_MASK, Fail, LoopDevice, Qcow2,  # noqa: E402
                     Suite, qemu_img, qemu_img_check, qemu_img_create,
                     qemu_io, require_loop, run)

SIZE = 16 * MiB


def compare(node, size, other, fmt="qcow2"):
    """QEMU's compare of the first `size` bytes of a raw device node with
    the disk `other`."""
    p = qemu_img("compare", "--image-opts",
                 "driver=raw,size=%d,file.driver=host_device,"
                 "file.filename=%s" % (size, node),
                 "driver=%s,file.filename=%s" % (fmt, other), ok=None)
    if p.returncode != 0:
        raise Fail("qemu-img compare %s (%d bytes) %s: %s" % (
            node, size, other, (p.stdout + p.stderr).strip()))


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def random_writes(img, rng, count, zeros=True):
    cmds = []
    for _ in range(count):
        off = rng.randrange(SIZE // 512) * 512
        length = min(rng.randrange(1, 512) * 512, SIZE - off)
        kind = rng.random()
        if zeros and kind < 0.2:
            cmds.append("write -z %d %d" % (off, length))
        elif zeros and kind < 0.3:
            cmds.append("discard %d %d" % (off, length))
        else:
            cmds.append("write -P %d %d %d" % (rng.randrange(1, 256), off,
                                               length))
    qemu_io(img, *cmds)


class Backups:
    """A disk and its backups: full (compressed) at state 0, inc1 and inc2
    (qbm extract --rotate) at states 1 and 2, raw references of the
    states; the disk ends with bitmap ck2 enabled and more writes after
    state 2 (state 3, for extract)."""

    def __init__(self, qbm, tmp, rng):
        self.qbm, self.tmp = qbm, tmp
        p = lambda name: os.path.join(tmp, name)  # noqa: E731
        self.disk, self.full = p("disk.qcow2"), p("full.qcow2")
        self.incs = [p("inc1.qcow2"), p("inc2.qcow2")]
        self.refs = [p("ref%d.raw" % i) for i in range(4)]
        qemu_img_create(self.disk, SIZE)
        random_writes(self.disk, rng, 20, zeros=False)
        run([qbm, "add", self.disk, "ck0"])
        qemu_img("convert", "-c", "-O", "qcow2", self.disk, self.full)
        qemu_img("convert", "-O", "raw", self.disk, self.refs[0])
        for i, inc in enumerate(self.incs):
            random_writes(self.disk, rng, 30)
            run([qbm, "extract", "--rotate", "ck%d" % (i + 1), "-o", inc,
                 self.disk, "ck%d" % i])
            qemu_img("convert", "-O", "raw", self.disk, self.refs[i + 1])
        random_writes(self.disk, rng, 10)
        qemu_img("convert", "-O", "raw", self.disk, self.refs[3])

    def chain(self, state):
        return [self.full] + self.incs[:state]


def unchanged(dev, before, what):
    if dev.contents() != before:
        raise Fail("%s: the device changed" % what)


def refused(qbm, argv, dev, what, words):
    """Run a qbm command that must be refused with `words` in its message
    and leave the device as it was."""
    before = dev.contents()
    p = run([qbm] + argv, ok=None)
    if p.returncode != 1 or p.stdout or not re.search(words, p.stderr):
        raise Fail("%s: exit %d, stdout %r, stderr %r" % (
            what, p.returncode, p.stdout, p.stderr))
    unchanged(dev, before, what)
    return p


def restore_raw(suite, tmp, rng):
    b = Backups(suite.qbm.path, tmp, rng)
    ref_file = os.path.join(tmp, "restored.raw")
    with LoopDevice(tmp, SIZE, "exact", rng) as dev, \
            LoopDevice(tmp, SIZE + 4 * MiB + 512, "large", rng) as big:
        tail = big.contents(SIZE)
        # The newest state first, so each later restore lands on data the
        # one before left (old data must become zeros where it reads so).
        for state in (2, 0, 1):
            chain = b.chain(state)
            run([suite.qbm.path, "restore", "-o", ref_file] + chain)
            for d in (dev, big):
                run([suite.qbm.path, "restore", "-o", d.node] + chain)
                compare(d.node, SIZE, b.refs[state], "raw")
                if d.contents(0, SIZE) != file_bytes(ref_file):
                    raise Fail("state %d on %s: differs from the restore "
                               "into a file" % (state, d.node))
            if big.contents(SIZE) != tail:
                raise Fail("state %d: the bytes past the virtual size of "
                           "the larger device changed" % state)


def unaligned(suite, tmp, rng):
    """Ranges not aligned to 4 KiB: a full backup with 512-byte clusters
    and an incremental of it, a raw full backup of an odd size; a device
    with 4 KiB sectors."""
    qbm = suite.qbm.path
    small = os.path.join(tmp, "small-clusters.qcow2")
    small_full = os.path.join(tmp, "small-full.qcow2")
    inc = os.path.join(tmp, "inc.qcow2")
    qemu_img_create(small, SIZE, "cluster_size=512")
    cmds = []
    for i in range(64):
        off = rng.randrange(SIZE // 512) * 512
        cmds.append("write -P %d %d %d" % (i + 1, off,
                                           rng.randrange(1, 20) * 512))
    qemu_io(small, *cmds)
    run([qbm, "add", "-g", "4096", small, "b0"])
    shutil.copyfile(small, small_full)
    random_writes(small, rng, 40)
    run([qbm, "extract", "-o", inc, small, "b0"])
    odd = os.path.join(tmp, "odd.raw")
    odd_size = 3 * MiB + 1000
    with open(odd, "wb") as f:
        f.write(rng.randbytes(odd_size // 2))
        f.write(bytes(odd_size // 4))
        f.write(rng.randbytes(odd_size - odd_size // 2 - odd_size // 4))
    with LoopDevice(tmp, SIZE, "dev", rng) as dev:
        tail = dev.contents(odd_size)
        run([qbm, "restore", "-o", dev.node, odd])
        if dev.contents(0, odd_size) != file_bytes(odd):
            raise Fail("a raw full backup of %d bytes: differs" % odd_size)
        if dev.contents(odd_size) != tail:
            raise Fail("written past the raw backup's size")
        run([qbm, "restore", "-o", dev.node, small_full])
        compare(dev.node, SIZE, small_full)
        run([qbm, "restore", "-o", dev.node, small_full, inc])
        compare(dev.node, SIZE, small)
    # A device with 4 KiB logical blocks: the 512-byte edges go through the
    # page cache, whole pages to BLKZEROOUT.
    with LoopDevice(tmp, SIZE, "dev4k", rng, sector_size=4096) as dev:
        run([qbm, "restore", "-o", dev.node, small_full, inc])
        compare(dev.node, SIZE, small)
    # qcow2 outputs whose data clusters the sources fill only in part: the
    # rest of each cluster must be zeroed on the device.
    qcow2_onto(qbm, tmp, rng, "restore", ["restore", "-O", "qcow2"],
               [small_full, inc], small, "qcow2", short=False)
    qcow2_onto(qbm, tmp, rng, "extract", ["extract"], [small, "b0"],
               short=False)


def qcow2_onto(qbm, tmp, rng, name, cmd, args, ref=None, ref_fmt="raw",
               short=True):
    """Run qbm CMD -o OUT ARGS into a file, then onto devices of the image
    end QEMU finds for that file and 1 MiB more (and 512 bytes less:
    refused, when short): each device passes qemu-img check, holds the
    same guest data as the file (and as ref) and the file's bytes up to
    the image end (zeros past the file's end), and keeps what follows."""
    out = os.path.join(tmp, name + ".qcow2")
    run([qbm] + cmd + ["-o", out] + args)
    info = qemu_img_check(out, "--output=json", "-f", "qcow2")
    end = json.loads(info.stdout)["image-end-offset"]
    want = file_bytes(out).ljust(end, b"\0")
    if short:
        with LoopDevice(tmp, end - 512, name + "-short", rng) as dev:
            refused(qbm, cmd + ["-o", dev.node] + args, dev,
                    "%s onto a device 512 bytes short" % name,
                    r"too small.*holds %d bytes.*needs %d" % (end - 512, end))
    for size in (end, end + MiB):
        with LoopDevice(tmp, size, "%s-%d" % (name, size), rng) as dev:
            tail = dev.contents(end)
            run([qbm] + cmd + ["-o", dev.node] + args)
            qemu_img_check(dev.node, "-f", "qcow2")
            if ref:
                p = qemu_img("compare", "-f", "qcow2", "-F", ref_fmt,
                             dev.node, ref, ok=None)
                if p.returncode != 0:
                    raise Fail("%s: the device differs from %s: %s" %
                               (name, ref, p.stdout + p.stderr))
            p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", dev.node,
                         out, ok=None)
            if p.returncode != 0:
                raise Fail("%s: the device differs from the file output: %s" %
                           (name, p.stdout + p.stderr))
            if dev.contents(0, end) != want:
                raise Fail("%s onto a device of %d bytes: its first %d bytes "
                           "differ from the file output" % (name, size, end))
            if dev.contents(end) != tail:
                raise Fail("%s: written past the image end" % name)


def qcow2_outputs(suite, tmp, rng):
    """restore -O qcow2 and extract onto a device; the exact size."""
    qbm = suite.qbm.path
    b = Backups(qbm, tmp, rng)
    qcow2_onto(qbm, tmp, rng, "restore", ["restore", "-O", "qcow2"],
               b.chain(2), b.refs[2])
    qcow2_onto(qbm, tmp, rng, "extract-full", ["extract", "--full"],
               [b.disk], b.refs[3])
    qcow2_onto(qbm, tmp, rng, "extract", ["extract"], [b.disk, "ck2"])


def compare_qcow2(node, ref):
    p = qemu_img("compare", "-f", "qcow2", "-F", "raw", node, ref, ok=None)
    if p.returncode != 0:
        raise Fail("qemu-img compare %s %s: %s" % (node, ref,
                                                   p.stdout + p.stderr))


def refusals(suite, tmp, rng):
    qbm = suite.qbm.path
    b = Backups(qbm, tmp, rng)
    with LoopDevice(tmp, SIZE - 512, "short", rng) as short:
        refused(qbm, ["restore", "-o", short.node] + b.chain(2), short,
                "restore onto a device 512 bytes smaller than the disk",
                r"too small.*holds %d bytes.*needs %d" % (SIZE - 512, SIZE))
    with LoopDevice(tmp, SIZE, "dev", rng) as dev:
        refused(qbm, ["restore", "-O", "qcow2", "--checkpoint", "c", "-o",
                      dev.node, b.full], dev, "restore --checkpoint",
                r"--checkpoint.*block device")
        # Held exclusively (as a mount or a device-mapper table does).
        fd = os.open(dev.node, os.O_RDONLY | os.O_EXCL)
        try:
            for argv in (["restore", "-o", dev.node, b.full],
                         ["extract", "--full", "-o", dev.node, b.disk]):
                refused(qbm, argv, dev, "%s onto a device in use" % argv[0],
                        r"in use")
        finally:
            os.close(fd)
        # Open in QEMU (a running VM): its locks.
        proc = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "sleep 60000",
                                 dev.node], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_open(proc, dev.node)
            refused(qbm, ["restore", "-o", dev.node, b.full], dev,
                    "restore onto a device QEMU has open", r"QEMU")
        finally:
            proc.kill()
            proc.wait()
        # Another node of the same device as an input.
        other = os.path.join(tmp, "other-node")
        os.mknod(other, 0o600 | stat.S_IFBLK, os.stat(dev.node).st_rdev)
        refused(qbm, ["restore", "-o", dev.node, other], dev,
                "restore from another node of the output device",
                r"overwrite")
        # Other non-regular outputs stay refused.
        fifo = os.path.join(tmp, "fifo")
        os.mkfifo(fifo)
        p = run([qbm, "restore", "-o", fifo, b.full], ok=(1,))
        if "not a regular file (fifo)" not in p.stderr:
            raise Fail("restore onto a fifo: %r" % p.stderr)


def corrupt_compressed(img):
    """Overwrite the middle of the compressed data of img's middle
    compressed cluster with garbage; returns its guest offset."""
    q = Qcow2(img)
    l2_entries = q.cluster_size // 8
    found = []
    for i, l1e in enumerate(q.l1_table()):
        if not l1e & OFFSET_MASK:
            continue
        l2 = q._table(l1e & OFFSET_MASK, l2_entries)
        for j, e in enumerate(l2):
            if e & (1 << 62):
                found.append(((i * l2_entries + j) * q.cluster_size, e))
    if len(found) < 3:
        raise Fail("%s: only %d compressed clusters" % (img, len(found)))
    guest, e = found[len(found) // 2]
    host = e & ((1 << (62 - (q.cluster_bits - 8))) - 1)
    with open(img, "r+b") as f:
        f.seek(host + 8)
        f.write(b"\xff" * 64)
    return guest


def failure(suite, tmp, rng):
    """A failure in the middle of writing a qcow2 image onto a device that
    held one: the device is no qcow2 image afterwards (never the old
    header over half-written tables)."""
    qbm = suite.qbm.path
    b = Backups(qbm, tmp, rng)
    bad = os.path.join(tmp, "bad.qcow2")
    shutil.copyfile(b.full, bad)
    corrupt_compressed(bad)
    with LoopDevice(tmp, SIZE * 2, "dev", rng) as dev:
        for cmd in (["extract", "--full"], ["restore", "-O", "qcow2"]):
            run([qbm] + cmd + ["-o", dev.node, b.full])
            qemu_img_check(dev.node, "-f", "qcow2")
            p = run([qbm] + cmd + ["-o", dev.node, bad], ok=(1,))
            if bad not in p.stderr:
                raise Fail("%s from a corrupt image: %r" % (cmd[0], p.stderr))
            p = qemu_img("info", "-f", "qcow2", dev.node, ok=None)
            if p.returncode == 0 or "qcow2" not in p.stderr:
                raise Fail("%s failed midway: the device still opens as "
                           "qcow2: %s" % (cmd[0], p.stdout + p.stderr))


def wait_open(proc, node):
    """Until proc has node open."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Fail("qemu-io exited: %d" % proc.returncode)
        fds = "/proc/%d/fd" % proc.pid
        try:
            for fd in os.listdir(fds):
                if os.readlink(os.path.join(fds, fd)) == node:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise Fail("qemu-io did not open %s" % node)


def progress(suite, tmp, rng):
    qbm = suite.qbm.path
    b = Backups(qbm, tmp, rng)
    with LoopDevice(tmp, SIZE, "dev", rng) as dev:
        for cmd, args, ref, fmt in (
                (["restore", "-p"], b.chain(2), b.refs[2], "raw"),
                (["extract", "--full", "-p"], [b.disk], b.refs[3], "qcow2")):
            p = run([qbm] + cmd + ["-o", dev.node] + args)
            figures = [float(x) for x in
                       re.findall(r"\((\d+\.\d\d)/100%\)", p.stderr)]
            if not figures or figures[-1] != 100.0 or \
                    figures != sorted(figures) or len(figures) < 3:
                raise Fail("%s -p: progress %r" % (cmd[0], p.stderr))
            if fmt == "raw":
                compare(dev.node, SIZE, ref, "raw")
            else:
                qemu_img_check(dev.node, "-f", "qcow2")
                compare_qcow2(dev.node, ref)


def symlink(suite, tmp, rng):
    qbm = suite.qbm.path
    b = Backups(qbm, tmp, rng)
    with LoopDevice(tmp, SIZE, "dev", rng) as dev:
        st = os.lstat(dev.node)
        os.mkdir(os.path.join(tmp, "vg"))
        link = os.path.join(tmp, "vg", "lv")
        os.symlink("../" + os.path.basename(dev.node), link)
        run([qbm, "restore", "-o", link] + b.chain(1))
        compare(dev.node, SIZE, b.refs[1], "raw")
        run([qbm, "extract", "--full", "-o", link, b.disk])
        qemu_img_check(dev.node, "-f", "qcow2")
        compare_qcow2(dev.node, b.refs[3])
        after = os.lstat(dev.node)
        if os.readlink(link) != "../" + os.path.basename(dev.node) or \
                (after.st_ino, after.st_rdev, after.st_mode) != \
                (st.st_ino, st.st_rdev, st.st_mode):
            raise Fail("the link or the node changed")
        if [f for f in os.listdir(tmp) if ".qbm-" in f] or \
                os.listdir(os.path.join(tmp, "vg")) != ["lv"]:
            raise Fail("temporary files left")


def main():
    suite = Suite("device_output", __doc__, tools=["qemu-img", "qemu-io"],
                  seeded=True)
    args = suite.start()
    require_loop()
    cases = [restore_raw, unaligned, qcow2_outputs, refusals, progress,
             symlink, failure]
    for i in suite.indices(len(cases)):
        fn = cases[i]
        suite.case(fn.__name__,
                   lambda tmp, fn=fn, i=i: fn(suite, tmp, suite.rng(i)),
                   index=i)
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
