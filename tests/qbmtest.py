# SPDX-License-Identifier: LGPL-2.1-or-later
"""What every qbm test suite (and benchmark) shares.

- running tools: run(), Qbm (the command under test), qemu_img(), qemu_io();
  an unexpected exit raises Fail naming the command, its exit and output;
- Fail, the one failure type a check raises;
- skip rules: Suite.start() exits 77 when a QEMU tool is missing, but under
  CI (CI set and not "false" or "0") a missing tool is a failure; a missing
  qbm, harness or library given on the command line is always a failure;
- Suite: the command line (--qbm, --seed, --only, --keep and the suite's
  own options), the seed (printed; QBM_TEST_SEED or --seed replays it),
  pass/fail counting, each case in its own temporary directory, and how to
  rerun a failed case alone;
- guest activity: RandomWriter (random data, compressed, zero writes,
  discards and identical rewrites through qemu-io, within QEMU 7.2's
  limits), holding() (an image held open by qemu-io or qemu-nbd, as by a
  running VM), qemu_io_holding() (a QEMU writer holding an image open,
  ready once it answers a read);
- the QEMU oracles: dirty_map() (qemu-nbd -r -B NAME + nbdinfo
  --map=qemu:dirty-bitmap:NAME), qemu_img_check(), qemu_img_info(),
  qemu_bitmaps(), qemu_img_compare(), qemu_map() and qemu_allocated()
  (qemu-img map);
- Qcow2: the layout of an image read straight from its bytes (header
  fields by name, extensions, refcount table, L1, bitmaps extension,
  directory and tables), for tests that patch or inspect the file;
- block devices: LoopDevice (a loop device over a file of garbage in a
  test's directory, reached only through a private node made there with
  mknod, always detached; it can be resized), require_loop() (the skip
  rules), file_hash() (a file's or a device's bytes, hashed) and
  qemu_image_end() (what `qemu-img check` reports as "Image end offset").

Suites import it from the tests/ directory (bench/ puts it on sys.path).
"""
import argparse
import contextlib
import hashlib
import fcntl
import json
import os
import random
import select
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

QEMU_TOOLS = ["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"]
SKIP = 77


class Fail(Exception):
    """A check failed; the message says what and where."""


class Timeout(Fail):
    """A command did not finish within its timeout."""


# ---------------------------------------------------------------------------
# Running tools

def run(cmd, ok=(0,), timeout=None, quiet=False, **kw):
    """Run cmd (a list) and return the CompletedProcess with text stdout and
    stderr. An exit status not in ok (None: any) raises Fail with the
    command line, the status and the output; running past timeout seconds
    raises Timeout. quiet sends stdout to /dev/null and leaves stderr on
    ours: no pipes to drain, for what a benchmark times. Other keywords go
    to subprocess.run: cwd, env, umask (the child's, e.g. umask=0o077)."""
    cmd = [str(c) for c in cmd]
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    try:
        # Bytes that are not UTF-8 (names) come back as os.fsdecode()
        # gives them, instead of failing the decoding.
        kw.setdefault("errors", "surrogateescape")
        p = subprocess.run(cmd, stdout=out, stderr=None if quiet else
                           subprocess.PIPE, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise Timeout("%s: still running after %s s" % (shlex.join(cmd),
                                                        timeout)) from None
    except FileNotFoundError:
        raise Fail("%s: %s not found" % (shlex.join(cmd), cmd[0])) from None
    if ok is not None and p.returncode not in ok:
        raise Fail("%s: exit %d, expected %s%s%s" % (
            shlex.join(cmd), p.returncode,
            " or ".join(str(x) for x in ok),
            "\n  stdout: " + p.stdout.strip() if p.stdout else "",
            "\n  stderr: " + p.stderr.strip() if p.stderr else ""))
    return p


class Qbm:
    """The qbm command under test (a path, or a wrapper running it under
    valgrind)."""

    def __init__(self, path):
        self.path = path

    def __call__(self, *args, ok=(0,), timeout=None):
        return run([self.path] + list(args), ok=ok, timeout=timeout)

    def json(self, *args):
        """qbm ARGS --output=json, parsed."""
        return json.loads(self(args[0], "--output=json",
                               *args[1:]).stdout)

    def dump(self, *args):
        """The extents qbm dump --output=json ARGS reports, as (offset,
        length) pairs."""
        d = self.json("dump", *args)
        return [(e["offset"], e["length"]) for e in d["extents"]]


def qemu_img(*args, ok=(0,), timeout=None, cwd=None):
    """qemu-img ARGS; cwd: the directory to run it in (QEMU opens a
    relative external data file name from there)."""
    return run(["qemu-img"] + list(args), ok=ok, timeout=timeout, cwd=cwd)


def qemu_io(img, *cmds, fmt="qcow2", ok=(0,), cwd=None):
    """qemu-io -f FMT -c CMD ... IMG."""
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    return run(args + [img], ok=ok, cwd=cwd)


def qemu_img_create(path, size, opts=None, backing=None, backing_fmt="qcow2",
                    fmt="qcow2"):
    """qemu-img create -q -f FMT [-o OPTS] [-b BACKING -F FMT] PATH SIZE.
    backing is written into the image as given (relative names are
    relative to the image's directory)."""
    cmd = ["create", "-q", "-f", fmt]
    if opts:
        cmd += ["-o", opts]
    if backing:
        cmd += ["-b", backing, "-F", backing_fmt]
    qemu_img(*(cmd + [path, str(size)]))
    return path


class RandomWriter:
    """Random guest writes to a qcow2 image through qemu-io, of the kinds a
    VM makes: data, compressed data, zero writes, discards, and rewrites
    of the bytes already there. cluster: the image's cluster size;
    compress: whether compressed writes are possible (not with extended
    L2). QEMU compresses only into clusters never written, so those are
    remembered; and QEMU 7.2 packs compressed data into the host cluster a
    discard freed (and reused for metadata) in the same process, so a
    compressed write after a discard starts a new qemu-io."""

    def __init__(self, path, size, cluster, rng, compress=True):
        self.path, self.size, self.cluster = path, size, cluster
        self.rng, self.compress = rng, compress
        self.touched = set()

    def _touch(self, off, length):
        c = self.cluster
        self.touched.update(range(off // c, -(-(off + length) // c)))

    def _range(self):
        rng = self.rng
        length = rng.choice([512, 4096, 65536, 300000, 2 * MiB])
        off = rng.randrange(0, max(1, self.size - length)) // 512 * 512
        return off, min(-(-length // 512) * 512, self.size - off)

    def step(self, n, rewrite_dir=None):
        """n random writes. With rewrite_dir (a directory for a scratch
        file), some are rewrites of the bytes the disk holds."""
        rng, cmds, discarded = self.rng, [], False
        for _ in range(n):
            off, length = self._range()
            kind = rng.random()
            if rewrite_dir and kind < 0.2:
                if cmds:
                    qemu_io(self.path, *cmds)
                    cmds = []
                raw = os.path.join(rewrite_dir, "rewrite.raw")
                # qemu-img dd counts the skipped blocks in count.
                qemu_img("dd", "-f", "qcow2", "-O", "raw", "bs=512",
                         "skip=%d" % (off // 512),
                         "count=%d" % ((off + length) // 512),
                         "if=" + self.path, "of=" + raw)
                cmds.append("write -s %s %d %d" % (raw, off, length))
                qemu_io(self.path, *cmds)
                cmds = []
                os.unlink(raw)
            elif kind < 0.5:
                cmds.append("write -P %d %d %d" %
                            (rng.randrange(1, 255), off, length))
            elif kind < 0.65:
                o = off // self.cluster * self.cluster
                if (o + self.cluster <= self.size and self.compress and
                        o // self.cluster not in self.touched):
                    if discarded:
                        qemu_io(self.path, *cmds)
                        cmds, discarded = [], False
                    cmds.append("write -c -P %d %d %d" %
                                (rng.randrange(1, 255), o, self.cluster))
                    self._touch(o, self.cluster)
                continue
            elif kind < 0.85:
                cmds.append("write -z %d %d" % (off, length))
            else:
                cmds.append("discard %d %d" % (off, length))
                discarded = True
            self._touch(off, length)
        if cmds:
            qemu_io(self.path, *cmds)


def overlay_on_disk(tmp, disk, ov, size, opts=""):
    """A metadata-only overlay (data_file_raw=on) whose data file is the
    existing raw disk: qemu-img create would empty the disk it names, so
    the overlay is made on a scratch file and pointed at the disk with
    qemu-img amend (its metadata, preallocated by data_file_raw, maps every
    cluster to the same offset of the disk)."""
    scratch = os.path.join(tmp, "scratch.raw")
    qemu_img_create(ov, size, opts="data_file=%s,data_file_raw=on%s" %
                    (scratch, opts))
    qemu_img("amend", "-o", "data_file=" + disk, ov)
    os.unlink(scratch)


def write_locked(path):
    """Whether a process holds QEMU's lock for the write permission on
    path (byte 101, docs/design.md "Locking"), tested without taking any
    lock: opening the image to find out could make the holder's own open
    fail."""
    with open(path, "rb") as f:
        # struct flock: l_type, l_whence, l_start, l_len, l_pid.
        req = struct.pack("hh4xqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 101, 1,
                          0)
        got = fcntl.fcntl(f.fileno(), fcntl.F_GETLK, req)
    return struct.unpack("hh4xqqi4x", got)[0] != fcntl.F_UNLCK


@contextlib.contextmanager
def holding(img, tool):
    """The image held open for writing by a running QEMU tool ("qemu-io",
    or "qemu-nbd" without -r), as a running VM holds its disk: waits until
    QEMU has taken its locks, and stops the tool afterwards."""
    if tool == "qemu-io":
        cmd = ["qemu-io", "-f", "qcow2", img]
    else:
        cmd = ["qemu-nbd", "-t", "-k", img + ".sock", "-f", "qcow2", img]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if write_locked(img):
                break
            time.sleep(0.05)
            if p.poll() is not None:
                raise Fail("%s %s: exit %d: %s" % (tool, img, p.returncode,
                                                   p.stderr.read()))
        else:
            raise Fail("%s never locked %s" % (tool, img))
        yield p
    finally:
        p.kill()
        p.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(img + ".sock")


# ---------------------------------------------------------------------------
# The QEMU oracles

def merge_extents(extents):
    """The union of (offset, length) ranges, sorted, touching ones joined."""
    out = []
    for off, length in sorted(extents):
        if out and off <= out[-1][0] + out[-1][1]:
            end = max(out[-1][0] + out[-1][1], off + length)
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((off, length))
    return out


def dirty_map_cmd(img, name, as_json=True, fmt="qcow2"):
    """The command that has QEMU export bitmap NAME of IMG read-only over a
    private NBD socket and prints its dirty map."""
    return (["nbdinfo"] + (["--json"] if as_json else []) +
            ["--map=qemu:dirty-bitmap:" + name, "--",
             "[", "qemu-nbd", "-r", "-f", fmt, "-B", name, img, "]"])


def dirty_map(img, name, fmt="qcow2"):
    """QEMU's view of bitmap NAME: its dirty extents (offset, length), in
    order, adjacent ones joined."""
    p = run(dirty_map_cmd(img, name, fmt=fmt))
    out = []
    for e in json.loads(p.stdout):
        if not e["type"] & 1:
            continue
        if out and out[-1][0] + out[-1][1] == e["offset"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"])
        else:
            out.append((e["offset"], e["length"]))
    return out


def qemu_map(img, cwd=None):
    """qemu-img map --output=json IMG, parsed: QEMU's view of where each
    guest range comes from (depth 0: the image's own layer)."""
    return json.loads(qemu_img("map", "--output=json", img, cwd=cwd).stdout)


def qemu_allocated(img, granularity=1, size=None):
    """The guest ranges IMG's own layer provides (data or zero flags:
    "present" at depth 0 in qemu-img map), rounded outwards to
    granularity and clipped to size: what populate must mark."""
    out = []
    for e in qemu_map(img):
        if e["depth"] != 0 or not e["present"]:
            continue
        start = e["start"] // granularity * granularity
        end = -(-(e["start"] + e["length"]) // granularity) * granularity
        if size is not None:
            end = min(end, size)
        out.append((start, end - start))
    return merge_extents(out)


def qemu_img_info(img, *opts):
    """qemu-img info --output=json [OPTS] IMG, parsed (a list with
    --backing-chain)."""
    return json.loads(qemu_img("info", "--output=json", *opts,
                               img).stdout)


def qemu_bitmaps(img, force_share=False):
    """{name: (granularity, sorted flags)} as qemu-img info lists them;
    force_share (-U) reads an image another process holds."""
    info = qemu_img_info(img, *(["-U"] if force_share else []))
    bms = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: (b["granularity"], sorted(b["flags"])) for b in bms}


@contextlib.contextmanager
def qemu_io_holding(img, fmt="qcow2", timeout=60):
    """A qemu-io that holds IMG open for writing (QEMU's writer locks, its
    bitmaps marked in use) until the block ends. It has opened the image
    once it answers a read (polling with another QEMU tool instead would
    race with its opening: a reader's locks make it fail)."""
    err = tempfile.TemporaryFile()
    p = subprocess.Popen(["qemu-io", "-f", fmt, img], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=err)
    try:
        p.stdin.write(b"read 0 512\n")
        p.stdin.flush()
        deadline = time.monotonic() + timeout
        out = b""
        while b"read 512/512 bytes" not in out:
            left = deadline - time.monotonic()
            ready = select.select([p.stdout], [], [], max(left, 0))[0]
            chunk = os.read(p.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                err.seek(0)
                raise Fail("qemu-io did not open %s (%s): %s" % (
                    img, "exit %d" % p.wait() if ready else "timeout",
                    err.read().decode(errors="replace").strip()))
            out += chunk
        yield p
    finally:
        if p.poll() is None:
            p.communicate(b"quit\n", timeout=timeout)
        err.close()


def qemu_img_check(img, *opts, ok=(0,)):
    """qemu-img check [OPTS] IMG; an exit not in ok (0: clean; 3 would
    allow leaked clusters) raises Fail with QEMU's report. Returns the
    CompletedProcess."""
    p = qemu_img("check", *opts, img, ok=None)
    if ok is not None and p.returncode not in ok:
        raise Fail("qemu-img check %s: exit %d\n%s" % (
            img, p.returncode, (p.stdout + p.stderr).strip()))
    return p


def qemu_image_end(img):
    """The "Image end offset" qemu-img check reports for IMG (the end of
    the last cluster in use), or None when it does not report one."""
    p = qemu_img_check(img, ok=None)
    for line in p.stdout.splitlines():
        if line.startswith("Image end offset:"):
            return int(line.split(":")[1])
    return None


def qemu_img_compare(a, b, *opts):
    """True when qemu-img compare [OPTS] A B finds the same guest data."""
    return qemu_img("compare", *opts, a, b, ok=None).returncode == 0


# ---------------------------------------------------------------------------
# The qcow2 layout, read from the file (docs/interop/qcow2.txt in QEMU)

# Header fields: name -> (offset, struct format). Version 3 adds the fields
# from incompatible_features on; header_length says how many are there.
HEADER = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
}
V2_HEADER_LENGTH = 72

EXT_END = 0
EXT_BACKING_FORMAT = 0xe2792aca
EXT_FEATURE_TABLE = 0x6803f857
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

# Bitmaps extension data: name -> (offset in the extension data, format).
BITMAPS_EXT = {
    "nb_bitmaps": (0, ">I"),
    "reserved32": (4, ">I"),
    "bitmap_directory_size": (8, ">Q"),
    "bitmap_directory_offset": (16, ">Q"),
}

# Bitmap directory entry: name -> (offset in the entry, format); then
# extra_data_size bytes of extra data, the name, padding to 8 bytes.
DIR_ENTRY = {
    "bitmap_table_offset": (0, ">Q"),
    "bitmap_table_size": (8, ">I"),
    "flags": (12, ">I"),
    "type": (16, ">B"),
    "granularity_bits": (17, ">B"),
    "name_size": (18, ">H"),
    "extra_data_size": (20, ">I"),
}
DIR_ENTRY_FIXED = 24

# Offset bits of L1, L2, refcount table and bitmap table entries.
OFFSET_MASK = 0x00fffffffffffe00


def align8(n):
    return (n + 7) // 8 * 8


class Extension:
    """One header extension: magic, length, offset (of its 8-byte
    magic/length header) and data (offset of its data)."""

    def __init__(self, magic, length, offset):
        self.magic, self.length, self.offset = magic, length, offset
        self.data = offset + 8


class BitmapEntry:
    """One bitmap directory entry: the DIR_ENTRY fields as attributes, plus
    offset (its file offset), name and size (bytes it takes)."""

    def __init__(self, buf, pos, offset):
        for field, (o, fmt) in DIR_ENTRY.items():
            setattr(self, field, struct.unpack_from(fmt, buf, pos + o)[0])
        start = pos + DIR_ENTRY_FIXED + self.extra_data_size
        # A name that is not UTF-8 comes back as os.fsdecode() gives it.
        self.name = bytes(buf[start:start + self.name_size]).decode(
            "utf-8", "surrogateescape")
        self.offset = offset
        self.size = align8(DIR_ENTRY_FIXED + self.extra_data_size +
                           self.name_size)


class Qcow2:
    """The layout of a qcow2 image: a path (read as needed, so a sparse
    16 TiB image costs nothing) or the image's bytes.

    Attributes: every HEADER field by name (those past header_length are
    None), cluster_size, extensions (a list of Extension, in file order),
    extensions_end (offset of the end marker), and when the image has a
    bitmaps extension: bitmaps_ext (its Extension), the BITMAPS_EXT fields,
    and bitmaps (a list of BitmapEntry). No validation beyond what reading
    needs: tests use it on images they have just made."""

    def __init__(self, source):
        if isinstance(source, (bytes, bytearray)):
            self._buf = source
            self._path = None
        else:
            self._buf = None
            self._path = source
        head = self.read(0, 4096)
        for field, (o, fmt) in HEADER.items():
            setattr(self, field, None)
            if o < V2_HEADER_LENGTH or self.version >= 3:
                setattr(self, field, struct.unpack_from(fmt, head, o)[0])
        self.cluster_size = 1 << self.cluster_bits
        hlen = self.header_length or V2_HEADER_LENGTH
        self.extensions = []
        cluster0 = self.read(0, self.cluster_size)
        pos = hlen
        while pos + 8 <= self.cluster_size:
            magic, length = struct.unpack_from(">II", cluster0, pos)
            if magic == EXT_END:
                break
            self.extensions.append(Extension(magic, length, pos))
            pos += 8 + align8(length)
        self.extensions_end = pos
        self.bitmaps_ext = self.extension(EXT_BITMAPS)
        self.bitmaps = []
        if self.bitmaps_ext:
            for field, (o, fmt) in BITMAPS_EXT.items():
                setattr(self, field, struct.unpack_from(
                    fmt, cluster0, self.bitmaps_ext.data + o)[0])
            d = self.read(self.bitmap_directory_offset,
                          self.bitmap_directory_size)
            pos = 0
            while pos + DIR_ENTRY_FIXED <= len(d):
                e = BitmapEntry(d, pos, self.bitmap_directory_offset + pos)
                self.bitmaps.append(e)
                pos += e.size

    def read(self, offset, length):
        if self._buf is not None:
            return bytes(self._buf[offset:offset + length])
        with open(self._path, "rb") as f:
            f.seek(offset)
            return f.read(length).ljust(length, b"\0")

    def _table(self, offset, entries):
        return list(struct.unpack(">%dQ" % entries,
                                  self.read(offset, 8 * entries)))

    def extension(self, magic):
        """The first Extension with this magic, or None."""
        for e in self.extensions:
            if e.magic == magic:
                return e
        return None

    def refcount_table(self):
        """The raw refcount table entries."""
        return self._table(self.refcount_table_offset,
                           self.refcount_table_clusters *
                           self.cluster_size // 8)

    def l1_table(self):
        """The raw active L1 table entries."""
        return self._table(self.l1_table_offset, self.l1_size)

    def bitmap(self, name):
        """The BitmapEntry called name (KeyError if none)."""
        for e in self.bitmaps:
            if e.name == name:
                return e
        raise KeyError("no bitmap %s" % name)

    def bitmap_table(self, entry):
        """The raw bitmap table entries of a BitmapEntry (or a name)."""
        if isinstance(entry, str):
            entry = self.bitmap(entry)
        return self._table(entry.bitmap_table_offset,
                           entry.bitmap_table_size)


def set_in_use(path, name):
    """Set the in_use flag of bitmap NAME in the file, as a QEMU that died
    with the image open leaves it."""
    entry = Qcow2(path).bitmap(name)
    with open(path, "r+b") as f:
        f.seek(entry.offset + DIR_ENTRY["flags"][0])
        f.write(struct.pack(DIR_ENTRY["flags"][1], entry.flags | 1))


def patch(buf, offset, fmt, value):
    """Write value at offset of a bytearray with a struct format."""
    struct.pack_into(fmt, buf, offset, value)


def set_bitmap_in_use(path, name):
    """Set the in_use flag of bitmap NAME in the image's directory, as a
    QEMU that dies with the image open leaves it (without touching the
    other bitmaps, as a crash would)."""
    entry = Qcow2(path).bitmap(name)
    with open(path, "r+b") as f:
        f.seek(entry.offset + DIR_ENTRY["flags"][0])
        f.write(struct.pack(">I", entry.flags | 1))


# ---------------------------------------------------------------------------
# Suites

def in_ci():
    return os.environ.get("CI", "") not in ("", "0", "false")


def require(tools, files=()):
    """Exit 77 (skip) when one of the tools is not on PATH, or 1 under CI;
    exit 1 when one of files (programs and libraries the command line
    named) does not exist."""
    for f in files:
        if f and not os.path.exists(f):
            print("%s: no such file" % f)
            sys.exit(1)
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        print("missing tools: %s" % " ".join(missing))
        if in_ci():
            print("(a failure under CI)")
            sys.exit(1)
        sys.exit(SKIP)


# ---------------------------------------------------------------------------
# Block devices

class LoopDevice:
    """A loop device over `size` bytes (a multiple of 512) of a file in the
    test's directory `tmp`, filled with random garbage from rng (a
    random.Random; default one seeded by the size) unless `fill` (bytes,
    repeated) is given; `sector_size`: its logical block size (losetup
    -b; default 512); `direct_io`: the loop driver reads and writes its
    backing file with O_DIRECT (losetup --direct-io=on), so the device's
    data sits in one page cache, the device's own, as on a disk or an LVM
    volume. Tests reach it only through `node`, a block device
    node made with mknod in tmp (same major and minor), never through
    /dev/loopN (`dev`); `backing` is the file behind it. Use it in a with
    statement, or call detach() in a finally, so that it is detached also
    on failure. Raises OSError when no loop device can be made."""

    def __init__(self, tmp, size, name="loop", rng=None, fill=None,
                 sector_size=None, direct_io=False):
        self.size = size
        self.backing = os.path.join(tmp, name + "-backing.img")
        self.node = os.path.join(tmp, name + "-node")
        self.dev = None
        rng = rng or random.Random(size)
        with open(self.backing, "wb") as f:
            # Zeros: a sparse file reads the same.
            left = 0 if fill and not fill.strip(b"\0") else size
            f.truncate(size)
            while left:
                n = min(left, MiB)
                f.write((fill * (n // len(fill) + 1))[:n] if fill else
                        rng.randbytes(n))
                left -= n
        opts = ["-b", str(sector_size)] if sector_size else []
        if direct_io:
            opts.append("--direct-io=on")
        p = subprocess.run(["losetup", "-f", "--show"] + opts +
                           [self.backing],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
        if p.returncode != 0 or not p.stdout.strip():
            raise OSError("losetup: %s" % (p.stderr.strip() or
                                          "exit %d" % p.returncode))
        self.dev = p.stdout.strip()
        try:
            os.mknod(self.node, 0o600 | stat.S_IFBLK,
                     os.stat(self.dev).st_rdev)
        except OSError:
            self.detach()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def contents(self, offset=0, length=None):
        """The device's bytes (through the private node)."""
        length = self.size - offset if length is None else length
        with open(self.node, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def resize(self, size):
        """Make the device `size` bytes (a multiple of 512): the backing
        file is cut or extended with zeros and the loop device told
        (losetup -c)."""
        os.truncate(self.backing, size)
        subprocess.run(["losetup", "-c", self.dev], check=True)
        with open(self.node, "rb") as f:
            if f.seek(0, 2) != size:
                raise OSError("%s: still %d bytes, not %d" % (
                    self.node, f.tell(), size))
        self.size = size

    def detach(self):
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev])
            self.dev = None


def require_loop():
    """Exit 77 (skip) when no loop device can be made here (no losetup,
    not root, no loop driver), or 1 under CI."""
    why = None
    if not shutil.which("losetup"):
        why = "losetup not found"
    else:
        d = tempfile.mkdtemp(prefix="qbm-loop-probe-")
        try:
            LoopDevice(d, 64 * KiB, fill=b"\0").detach()
        except OSError as e:
            why = "cannot make a loop device: %s" % e
        finally:
            shutil.rmtree(d, ignore_errors=True)
    if why:
        print(why)
        if in_ci():
            print("(a failure under CI)")
            sys.exit(1)
        sys.exit(SKIP)


def file_hash(path):
    """SHA-256 of a file's or a device's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def tempdir(prefix, keep=False):
    """A fresh directory, removed afterwards with everything in it unless
    keep (or QBM_TEST_KEEP=1): then its path is printed."""
    keep = keep or os.environ.get("QBM_TEST_KEEP") == "1"
    path = tempfile.mkdtemp(prefix="qbm-%s-" % prefix)
    try:
        yield path
    finally:
        if keep:
            print("kept %s" % path)
        else:
            shutil.rmtree(path, ignore_errors=True)


class Suite:
    """One test program: its command line, tools, seed and results.

        suite = Suite("oracle", __doc__, seeded=True)
        suite.parser.add_argument("--scenarios", type=int, default=60)
        args = suite.start()
        suite.scenarios(args.scenarios, lambda tmp, rng: ...)
        sys.exit(suite.finish())

    A case is a function of a fresh temporary directory that raises Fail;
    a Fail is counted and printed with the case's label (and how to rerun
    it alone in a seeded suite), and the next case runs."""

    def __init__(self, name, doc, tools=QEMU_TOOLS, seeded=False,
                 indexed=True):
        self.name, self.tools, self.seeded = name, tools, seeded
        self.parser = argparse.ArgumentParser(
            description=doc.strip().splitlines()[0] if doc else name,
            epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.parser.add_argument("--qbm", required=True,
                                 help="the qbm command to test")
        self.parser.add_argument("--keep", action="store_true",
                                 help="keep the temporary directories")
        if seeded:
            self.parser.add_argument(
                "--seed", type=int, help="replay this seed (default: "
                "QBM_TEST_SEED, else a random one)")
        if seeded and indexed:
            self.parser.add_argument(
                "--only", type=int, action="append", metavar="N",
                help="run only case N (with the seed of a failed run)")
        self.passed = self.failed = 0
        self.seed = None
        self.args = None
        self.qbm = None

    def start(self, paths=()):
        """Parse the command line, apply the skip rules (paths: the names
        of options besides --qbm that name files which must exist, when
        given) and print the seed. Returns the parsed arguments."""
        self.args = self.parser.parse_args()
        require(self.tools, [self.args.qbm] +
                [getattr(self.args, p) for p in paths])
        self.qbm = Qbm(self.args.qbm)
        # meson stops a test that runs too long with SIGTERM: unwind, so
        # that the temporary directories go too.
        signal.signal(signal.SIGTERM, lambda signo, frame: sys.exit(
            128 + signo))
        if self.seeded:
            seed = self.args.seed
            if seed is None:
                seed = int(os.environ.get("QBM_TEST_SEED",
                                          random.randrange(1 << 30)))
            self.seed = seed
            print("seed %d (set QBM_TEST_SEED to reproduce)" % seed,
                  flush=True)
        return self.args

    def rng(self, index):
        """The random generator of case index under the run's seed."""
        return random.Random(self.seed * 1000 + index)

    def indices(self, count):
        """range(count), or the --only ones of it."""
        only = getattr(self.args, "only", None)
        return [i for i in range(count) if not only or i in only]

    def scenarios(self, count, fn):
        """Case 'scenario I (seed S)' for each of indices(count): fn(tmp,
        rng) with the scenario's own generator, rng(I)."""
        for i in self.indices(count):
            self.case("scenario %d (seed %d)" % (i, self.seed),
                      lambda tmp: fn(tmp, self.rng(i)), index=i)

    def rerun_hint(self, index):
        argv = [a for a in sys.argv if a]
        cmd = [sys.executable, argv[0]]
        skip = False
        for a in argv[1:]:
            if skip:
                skip = False
                continue
            if a in ("--seed", "--only"):
                skip = True
                continue
            if a.startswith("--seed=") or a.startswith("--only="):
                continue
            cmd.append(a)
        cmd += ["--seed", str(self.seed), "--only", str(index)]
        return shlex.join(cmd)

    def tempdir(self):
        return tempdir(self.name, keep=bool(self.args and self.args.keep))

    def ok(self, n=1):
        self.passed += n

    def fail(self, msg, index=None):
        """Count a failure and print it (msg: what failed, and where)."""
        self.failed += 1
        print("FAIL %s" % msg, flush=True)
        if self.seeded and index is not None and "only" in self.args:
            print("  rerun alone: %s" % self.rerun_hint(index), flush=True)

    def check(self, cond, msg, index=None):
        """Count cond as a pass, or as the failure msg."""
        if cond:
            self.ok()
        else:
            self.fail(msg, index)
        return cond

    def case(self, label, fn, index=None):
        """Run fn(tmp) in a fresh temporary directory; a Fail it raises is
        counted and printed as 'FAIL label: message' (label may be a
        function, called only then), any other exception likewise with
        its traceback. Returns True when fn passed."""
        with self.tempdir() as tmp:
            try:
                fn(tmp)
            except Fail as e:
                text = label() if callable(label) else label
                self.fail("%s: %s" % (text, e), index)
                return False
            except Exception:
                text = label() if callable(label) else label
                self.fail("%s: the test itself failed:\n%s" %
                          (text, traceback.format_exc()), index)
                return False
        self.ok()
        return True

    def finish(self):
        """Print the totals; the exit status."""
        print("%s: %d passed, %d failed" % (self.name, self.passed,
                                            self.failed))
        return 1 if self.failed else 0
