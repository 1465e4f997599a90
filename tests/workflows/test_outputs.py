#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Output files of restore and extract.

- A new output gets 0666 minus the umask (a private disk stays private
  under umask 077); an existing output keeps its permission bits.
- OUTPUT naming a character device, a fifo, a socket or a directory
  (directly or through a symbolic link) is refused with a clear message
  and a non-zero exit, and the node is left as it was: same type, same
  inode, nothing written through it, no temporary file left. (Block
  devices are written in place: test_device_output.py.)
- A symbolic link as OUTPUT stays a link: the file it points to gets the
  data (a dangling link creates its target, as qemu-img convert does),
  the temporary file goes beside the target.
- OUTPUT naming an input, or a backing file of extract's image, is
  refused and left as it was.
- The final rename replaces nothing but a regular file even when OUTPUT
  changes while the output is written: qbm is held on its progress output
  (a full stderr pipe) while the test swaps OUTPUT.
QEMU judges the contents (qemu-img compare against reference outputs).
--quick (the valgrind run) keeps one case of each path: new outputs under
one umask, an existing output once per command family, each node type
refused once (and once through a link), one link to an existing file and
one dangling link, the refused links, and one race of each outcome.
"""
import fcntl
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (MiB, Fail, Suite, qemu_img,  # noqa: E402
                     qemu_img_check, qemu_img_compare, qemu_img_create,
                     qemu_io, run)


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def ident(path):
    """What must not change about a node: type, inode, device number."""
    st = os.lstat(path)
    return (stat.S_IFMT(st.st_mode), st.st_dev, st.st_ino, st.st_rdev)


def leftovers(*dirs):
    return [os.path.join(d, f) for d in dirs for f in os.listdir(d)
            if ".qbm-" in f]


class Setup:
    """A disk with a checkpoint, its full backup and reference outputs (each
    made by a plain run of its command the first time it is needed)."""

    def __init__(self, qbm, tmp, quick=False):
        self.qbm = qbm
        self.tmp = tmp
        self.quick = quick
        self.base = os.path.join(tmp, "base.qcow2")
        self.disk = os.path.join(tmp, "disk.qcow2")
        self.full = os.path.join(tmp, "full.qcow2")
        qemu_img_create(self.base, "32M")
        qemu_io(self.base, "write -P 7 0 3M", "write -P 9 20M 1M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", self.base, "-F",
                 "qcow2", self.disk)
        run([qbm, "add", self.base, "ck0"])
        run([qbm, "add", self.disk, "ck0"])
        qemu_io(self.disk, "write -P 5 1M 2M", "write -z 20M 64k",
                "write -P 3 30M 1M")
        qemu_img("convert", "-O", "qcow2", self.disk, self.full)
        self.work = os.path.join(tmp, "work.qcow2")
        self.refs = {}

    def ref(self, name):
        """The reference output of a command."""
        if name not in self.refs:
            ref = os.path.join(self.tmp, "ref-" + name)
            run(self.command(name, ref))
            self.refs[name] = ref
        return self.refs[name]

    @staticmethod
    def commands():
        return ["restore-raw", "restore-qcow2", "extract-full",
                "extract-rotate", "extract-chain"]

    def command(self, name, out, progress=False):
        """argv of a command writing `out`; extract-rotate rotates a fresh
        copy of the disk (self.work)."""
        p = ["-p"] if progress else []
        if name == "restore-raw":
            return [self.qbm, "restore"] + p + ["-o", out, self.full]
        if name == "restore-qcow2":
            return [self.qbm, "restore", "-O", "qcow2", "--checkpoint",
                    "ck1"] + p + ["-o", out, self.full]
        if name == "extract-full":
            return [self.qbm, "extract", "--full"] + p + ["-o", out,
                                                          self.disk]
        if name == "extract-rotate":
            shutil.copyfile(self.disk, self.work)
            return [self.qbm, "extract", "--rotate", "ck1"] + p + [
                "-o", out, self.work, "ck0"]
        if name == "extract-chain":
            return [self.qbm, "extract", "--chain"] + p + ["-o", out,
                                                           self.disk, "ck0"]
        raise ValueError(name)

    def check_content(self, name, out):
        if not qemu_img_compare(out, self.ref(name)):
            raise Fail("%s: %s differs from the reference output" %
                       (name, out))
        if name.endswith("qcow2") or name.startswith("extract"):
            qemu_img_check(out)


def modes(s):
    d = os.path.join(s.tmp, "modes")
    os.mkdir(d)
    umasks = (0o077,) if s.quick else (0o077, 0o022, 0o027, 0o002)
    for umask in umasks:
        for name in s.commands():
            out = os.path.join(d, "%s-%03o" % (name, umask))
            run(s.command(name, out), umask=umask)
            mode = stat.S_IMODE(os.lstat(out).st_mode)
            if not stat.S_ISREG(os.lstat(out).st_mode):
                raise Fail("%s: output is not a regular file" % name)
            if mode != 0o666 & ~umask:
                raise Fail("%s under umask %03o: mode %03o, expected %03o" %
                           (name, umask, mode, 0o666 & ~umask))
            s.check_content(name, out)
            os.unlink(out)
    # An existing output keeps its permissions, whatever the umask.
    cases = ((0o022, 0o600), (0o077, 0o640), (0o022, 0o660))
    for name in ("restore-raw", "extract-full"):
        for umask, old in cases[:1] if s.quick else cases:
            out = os.path.join(d, "old-%s" % name)
            with open(out, "wb") as f:
                f.write(b"old contents" * 1000)
            os.chmod(out, old)
            run(s.command(name, out), umask=umask)
            mode = stat.S_IMODE(os.lstat(out).st_mode)
            if mode != old:
                raise Fail("%s over a %03o file under umask %03o: mode %03o" %
                           (name, old, umask, mode))
            s.check_content(name, out)
            os.unlink(out)
    if leftovers(d):
        raise Fail("temporary files left: %s" % leftovers(d))


def make_node(kind, path):
    """Create a node of `kind` at path; False when this system cannot."""
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "socket":
        sk = socket.socket(socket.AF_UNIX)
        sk.bind(path)
        sk.close()
    elif kind == "char":
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            return False
    return True


def refused(s, cmd_name, out, what, nodes_dir, check_path):
    """Run a command that must be refused; nothing may change."""
    before = ident(check_path)
    link = os.readlink(out) if os.path.islink(out) else None
    argv = s.command(cmd_name, out)
    work = digest(s.work) if cmd_name == "extract-rotate" else None
    p = run(argv, ok=None)
    if p.returncode != 1 or p.stdout:
        raise Fail("%s onto %s: exit %d, stdout %r" %
                   (cmd_name, what, p.returncode, p.stdout))
    if out not in p.stderr or "not a regular file" not in p.stderr:
        raise Fail("%s onto %s: unclear message %r" %
                   (cmd_name, what, p.stderr))
    if ident(check_path) != before:
        raise Fail("%s onto %s: the node changed" % (cmd_name, what))
    if link is not None and (not os.path.islink(out) or
                             os.readlink(out) != link):
        raise Fail("%s onto %s: the link changed" % (cmd_name, what))
    if work is not None and digest(s.work) != work:
        raise Fail("%s onto %s: the image changed (rotated?)" %
                   (cmd_name, what))
    if leftovers(nodes_dir):
        raise Fail("temporary files left: %s" % leftovers(nodes_dir))


def non_regular(s, notes):
    d = os.path.join(s.tmp, "nodes")
    os.mkdir(d)
    kinds = ("char", "fifo", "socket", "directory")
    for i, kind in enumerate(kinds):
        node = os.path.join(d, kind)
        if not make_node(kind, node):
            notes.append("%s device cases skipped (no mknod)" % kind)
            continue
        link = os.path.join(d, "link-to-" + kind)
        os.symlink(kind, link)
        names = s.commands()
        if s.quick:
            # Each node type once, the commands in turn; one of them
            # through a link too.
            names = [names[i % len(names)]]
        for name in names:
            refused(s, name, node, kind, d, node)
            if not s.quick or kind == "fifo":
                refused(s, name, link, "a link to a " + kind, d, node)
        if kind == "directory" and os.listdir(node):
            raise Fail("something was written into the directory: %s" %
                       os.listdir(node))


def symlinks(s):
    links = os.path.join(s.tmp, "links")
    data = os.path.join(s.tmp, "data")
    os.mkdir(links)
    os.mkdir(data)

    def through(name, link, target, mode, umask=0o022):
        text = os.readlink(link)
        run(s.command(name, link), umask=umask)
        if not os.path.islink(link) or os.readlink(link) != text:
            raise Fail("%s: the link %s was replaced" % (name, link))
        st = os.lstat(target)
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != mode:
            raise Fail("%s: target %s: mode %o" % (name, target, st.st_mode))
        s.check_content(name, target)
        if leftovers(links, data):
            raise Fail("temporary files left: %s" % leftovers(links, data))

    # Relative link to an existing file in another directory (--quick: only
    # this shape, with one command, and one dangling link).
    real = os.path.join(data, "real")
    for name in s.commands()[:1] if s.quick else s.commands():
        with open(real, "wb") as f:
            f.write(b"x" * 4096)
        os.chmod(real, 0o600)
        link = os.path.join(links, "rel-" + name)
        os.symlink("../data/real", link)
        through(name, link, real, 0o600)
    # Absolute link, and a link to a link.
    if not s.quick:
        os.symlink(real, os.path.join(links, "abs"))
        through("restore-raw", os.path.join(links, "abs"), real, 0o600)
        os.symlink("abs", os.path.join(links, "hop"))
        through("extract-full", os.path.join(links, "hop"), real, 0o600)
    # Dangling: the target is created, with the umask's mode.
    for i, name in enumerate(s.commands()):
        if s.quick and name != "extract-full":
            continue
        target = os.path.join(data, "new%d" % i)
        link = os.path.join(links, "dangling-" + name)
        os.symlink("../data/new%d" % i, link)
        through(name, link, target, 0o640, umask=0o027)
    # Dangling into a missing directory, and a loop: refused, unchanged.
    for link, text in (("nodir", "../missing/x"), ("loop1", "loop2"),
                       ("loop2", "loop1")):
        os.symlink(text, os.path.join(links, link))
    for link in ("nodir", "loop1"):
        path = os.path.join(links, link)
        p = run(s.command("restore-raw", path), ok=(1,))
        if path not in p.stderr:
            raise Fail("unclear message for %s: %r" % (link, p.stderr))
        if os.readlink(path) not in ("../missing/x", "loop2"):
            raise Fail("link %s changed" % link)
    if os.path.exists(os.path.join(s.tmp, "missing")):
        raise Fail("a dangling link's missing directory was created")
    # A link to an input is that input: refused, nothing changed.
    to_full = os.path.join(links, "to-full")
    os.symlink(s.full, to_full)
    before = digest(s.full)
    for argv in (s.command("restore-raw", to_full),
                 [s.qbm, "extract", "--full", "-o", to_full, s.full]):
        p = run(argv, ok=(1,))
        if "overwrite" not in p.stderr or digest(s.full) != before or \
                os.readlink(to_full) != s.full:
            raise Fail("output linked to the input: %r" % p.stderr)
    # extract onto a backing file of its image: refused, the backing file
    # unchanged (it would be replaced under the image).
    before = digest(s.base)
    p = run([s.qbm, "extract", "--full", "-o", s.base, s.disk], ok=(1,))
    if "a backing file of the image" not in p.stderr or \
            digest(s.base) != before:
        raise Fail("extract onto its image's backing file: %r" % p.stderr)
    # A link on another file system: the temporary file must be beside the
    # target, else the final rename cannot work.
    shm = "/dev/shm"
    if not s.quick and os.path.isdir(shm) and \
            os.stat(shm).st_dev != os.stat(data).st_dev:
        other = tempfile.mkdtemp(prefix="qbm-out-", dir=shm)
        try:
            link = os.path.join(other, "out")
            os.symlink(real, link)
            through("restore-raw", link, real, 0o600)
            if leftovers(other):
                raise Fail("temporary files left: %s" % leftovers(other))
        finally:
            shutil.rmtree(other)


def held(s, name, out, swap):
    """Run a command with its stderr pipe full, so it stops at its first
    progress report (after OUTPUT was checked and its temporary file
    created, before the rename); call swap(), then let it go on."""
    rfd, wfd = os.pipe()
    fcntl.fcntl(wfd, fcntl.F_SETFL, os.O_NONBLOCK)
    try:
        while True:
            os.write(wfd, b"\0" * 4096)
    except BlockingIOError:
        pass
    fcntl.fcntl(wfd, fcntl.F_SETFL, 0)
    proc = subprocess.Popen(s.command(name, out, progress=True),
                            stdout=subprocess.PIPE, stderr=wfd, text=True)
    os.close(wfd)
    try:
        d = os.path.dirname(out)
        deadline = time.monotonic() + 60
        while not leftovers(d):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise Fail("%s: no temporary file appeared" % name)
            time.sleep(0.01)
        swap()
    finally:
        err = b""
        while True:
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            err += chunk
        os.close(rfd)
        proc.wait()
    return proc.returncode, err.replace(b"\0", b"").decode(errors="replace")


def races(s, notes):
    d = os.path.join(s.tmp, "races")
    os.mkdir(d)
    can_mknod = make_node("char", os.path.join(d, "probe"))
    if can_mknod:
        os.unlink(os.path.join(d, "probe"))
    kinds = ["fifo", "directory"] + (["char"] if can_mknod else [])
    names = ["restore-raw", "extract-full"]
    if s.quick:
        # One command, one node type; a new and an existing OUTPUT each
        # (they publish differently), refused or replaced.
        names, kinds = names[:1], kinds[:1]
    for name in names:
        for kind in kinds:
            for existed in (True, False):
                out = os.path.join(d, "out")
                if existed:
                    with open(out, "wb") as f:
                        f.write(b"old")

                node = []

                def swap():
                    if existed:
                        os.unlink(out)
                    make_node(kind, out)
                    node.append(ident(out))

                rc, err = held(s, name, out, swap)
                what = "%s %s: OUTPUT %s became a %s" % (
                    name, "replacing a file" if existed else "new file",
                    out, kind)
                if rc != 1 or out not in err:
                    raise Fail("%s: exit %d, %r" % (what, rc, err))
                if not os.path.lexists(out) or ident(out) != node[0]:
                    raise Fail("%s: the node was replaced" % what)
                if kind == "directory" and os.listdir(out):
                    raise Fail("%s: written into" % what)
                if leftovers(d):
                    raise Fail("%s: left %s" % (what, leftovers(d)))
                if kind == "directory":
                    os.rmdir(out)
                else:
                    os.unlink(out)
        # A regular file appearing, or replaced by another, is replaced.
        for existed in (True, False):
            out = os.path.join(d, "out")
            if existed:
                with open(out, "wb") as f:
                    f.write(b"old")

            def swap():
                if existed:
                    os.unlink(out)
                with open(out, "wb") as f:
                    f.write(b"newer")

            rc, err = held(s, name, out, swap)
            if rc != 0:
                raise Fail("%s: a regular file at OUTPUT: exit %d %r" %
                           (name, rc, err))
            s.check_content(name, out)
            os.unlink(out)
            if leftovers(d):
                raise Fail("left %s" % leftovers(d))
    if not can_mknod:
        notes.append("device races skipped (no mknod)")


def main():
    suite = Suite("outputs", __doc__, tools=["qemu-img", "qemu-io"])
    suite.parser.add_argument("--quick", action="store_true",
                              help="one case of each path (valgrind)")
    args = suite.start()
    notes = []
    for part in (modes, non_regular, symlinks, races):
        def fn(tmp, part=part):
            s = Setup(args.qbm, tmp, quick=args.quick)
            if part in (non_regular, races):
                part(s, notes)
            else:
                part(s)
        suite.case(part.__name__, fn)
    for n in notes:
        print("note: %s" % n)
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
