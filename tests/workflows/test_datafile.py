#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""External data files: restore, extract, consolidate and populate.

qcow2 overlays made by qemu-img with data_file= (data_file_raw on and off,
sometimes extended L2 entries, sometimes over a backing file) take random
guest writes through qemu-io: data, zero writes with and without unmap,
discards. A bitmap added before the writes records them. Then QEMU judges:
restore and extract --full against the overlay (`qemu-img compare`), the
incremental extract of the bitmap restored over the disk as it was before,
consolidate of the overlay into a copy of its backing file, and populate's
bitmap (qemu-nbd -r -B + nbdinfo) against `qemu-img map`'s allocation of
the overlay. Fixed cases: the KubeVirt shape (a raw disk with data, a
metadata-only overlay with data_file_raw=on and a bitmap, the extract of
its dirty clusters), a relative data file name (opened from the working
directory, as QEMU opens it), a missing data file (a clear error naming
both files, nothing written), a data file a writer holds, and a compressed
cluster in an image with a data file (corruption).
Seeded; QBM_TEST_SEED reproduces a run.
"""
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (EXT_DATA_FILE, MiB, OFFSET_MASK, Fail,  # noqa: E402
                     Qcow2, Suite, dirty_map, merge_extents, overlay_on_disk,
                     qemu_allocated, qemu_img, qemu_img_check,
                     qemu_img_compare as same, qemu_img_create, qemu_io,
                     qemu_map, run)


def data_bytes(img):
    """Bytes the image's own layer stores as data (not zero flags)."""
    return sum(e["length"] for e in qemu_map(img)
               if e["depth"] == 0 and e["data"])


def guest_writes(rng, size, n):
    """n random qemu-io commands: data, zero writes (with and without
    unmap) and discards."""
    cmds = []
    for _ in range(n):
        length = rng.choice([512, 4096, 65536, 300000, 2 * MiB])
        off = rng.randrange(0, max(1, size - length)) // 512 * 512
        length = min(-(-length // 512) * 512, size - off)
        kind = rng.random()
        if kind < 0.55:
            cmds.append("write -P %d %d %d" % (rng.randrange(1, 255), off,
                                               length))
        elif kind < 0.7:
            cmds.append("write -z %d %d" % (off, length))
        elif kind < 0.85:
            cmds.append("write -z -u %d %d" % (off, length))
        else:
            cmds.append("discard %d %d" % (off, length))
    return cmds


def outputs_left(tmp, names):
    return sorted(f for f in os.listdir(tmp)
                  if any(f.startswith(n) or f.startswith("." + n)
                         for n in names))


def scenario(qbm, tmp, rng, desc):
    raw_mode = rng.random() < 0.5
    size = rng.choice([8, 20, 33]) * MiB + rng.choice([0, 512, 65536])
    cs = rng.choice([4096, 65536])
    extl2 = cs == 65536 and rng.random() < 0.3
    backing = not raw_mode and rng.random() < 0.5
    on_disk = raw_mode and rng.random() < 0.5
    gran = rng.choice([4096, 65536, 131072])
    data = os.path.join(tmp, "disk.data")
    ov = os.path.join(tmp, "ov.qcow2")
    opts = ",cluster_size=%d%s" % (cs, ",extended_l2=on" if extl2 else "")
    desc.append("size %d%s, data_file_raw %s%s%s, granularity %d" % (
        size, opts, "on" if raw_mode else "off",
        ", on an existing disk" if on_disk else "",
        ", backing file" if backing else "", gran))

    base = None
    if backing:
        base = os.path.join(tmp, "base.qcow2")
        bopts = None
        if rng.random() < 0.3:
            bopts = "data_file=" + os.path.join(tmp, "base.data")
            desc.append("the backing file has a data file too")
        qemu_img_create(base, size, opts=bopts)
        qemu_io(base, *guest_writes(rng, size, 6))
    if on_disk:
        qemu_img_create(data, size, fmt="raw")
        qemu_io(data, *guest_writes(rng, size, 6), fmt="raw")
        overlay_on_disk(tmp, data, ov, size, opts)
    else:
        qemu_img_create(ov, size, opts="data_file=%s%s%s" % (
            data, ",data_file_raw=on" if raw_mode else "", opts),
            backing="base.qcow2" if backing else None)
    qemu_io(ov, *guest_writes(rng, size, rng.randint(0, 4)))
    before = os.path.join(tmp, "before.raw")
    qemu_img("convert", "-O", "raw", ov, before)
    qemu_img("bitmap", "--add", "-g", str(gran), ov, "b")
    qemu_io(ov, *guest_writes(rng, size, rng.randint(1, 8)))

    # restore: the overlay as the last incremental over its backing file.
    fmt = rng.choice(["raw", "qcow2"])
    out = os.path.join(tmp, "out." + fmt)
    qbm("restore", "-O", fmt, "-o", out, *([base] if base else []), ov)
    if fmt == "qcow2":
        qemu_img_check(out)
    if not same(out, ov):
        raise Fail("restore -O %s differs from the overlay" % fmt)

    # extract --full reads through the chain.
    full = os.path.join(tmp, "full.qcow2")
    qbm("extract", "--full", "-o", full, ov)
    qemu_img_check(full)
    if not same(full, ov):
        raise Fail("extract --full differs from the overlay")

    # The incremental of bitmap b, restored over the disk before.
    inc = os.path.join(tmp, "inc.qcow2")
    qbm("extract", "-o", inc, ov, "b")
    qemu_img_check(inc)
    dirty = dirty_map(ov, "b")
    if dirty != qbm.dump(ov, "b"):
        raise Fail("qbm dump and QEMU disagree on bitmap b")
    ics = 1 << Qcow2(inc).cluster_bits
    limit = sum(-(-(off + length) // ics) * ics - off // ics * ics
                for off, length in dirty)
    if data_bytes(inc) > limit:
        raise Fail("the incremental stores %d bytes, bitmap b marks %d" %
                   (data_bytes(inc), limit))
    out2 = os.path.join(tmp, "out2.raw")
    qbm("restore", "-o", out2, before, inc)
    if not same(out2, ov):
        raise Fail("the disk before + the incremental differs from the "
                   "overlay")

    # consolidate the overlay's own layer into a copy of what is below it.
    rolled = os.path.join(tmp, "rolled.qcow2")
    if base:
        qemu_img("convert", "-O", "qcow2", base, rolled)
    else:
        qemu_img_create(rolled, size)
    qbm("consolidate", rolled, ov)
    qemu_img_check(rolled)
    if not same(rolled, ov):
        raise Fail("consolidate of the overlay differs from it")

    # populate: what the overlay's metadata says it holds.
    pgran = rng.choice([512, 65536, 1 << 20])
    qbm("add", "-g", str(pgran), ov, "p")
    qbm("populate", ov, "p")
    want = qemu_allocated(ov, pgran, size)
    got = dirty_map(ov, "p")
    if got != want:
        raise Fail("populate marked %s, qemu-img map allocates %s" %
                   (got[:8], want[:8]))
    qemu_img_check(ov)
    qbm("check", ov)


def kubevirt(qbm, tmp):
    """A raw disk with data, a metadata-only overlay with data_file_raw=on
    and a bitmap (changed-block tracking), guest writes through the
    overlay, the extract of the dirty clusters, then a rotation."""
    size = 64 * MiB
    disk = os.path.join(tmp, "disk.img")
    ov = os.path.join(tmp, "disk.qcow2")
    qemu_img_create(disk, size, fmt="raw")
    qemu_io(disk, "write -P 0x5a 0 16M", "write -P 0x6b 40M 3M", fmt="raw")
    backup0 = os.path.join(tmp, "backup0.raw")
    shutil.copyfile(disk, backup0)
    overlay_on_disk(tmp, disk, ov, size)
    qemu_img("bitmap", "--add", ov, "cbt")
    qemu_io(ov, "write -P 0x11 1M 64k", "write -P 0x22 20M 1M",
            "write -z 42M 128k", "discard 8M 64k", "write -P 0x33 63M 4k")
    # The raw disk stays a consistent image by itself.
    if not same(disk, ov, "-f", "raw", "-F", "qcow2"):
        raise Fail("the raw disk and the overlay differ")
    dirty = dirty_map(ov, "cbt")
    expect = [(1 * MiB, 64 * 1024), (8 * MiB, 64 * 1024),
              (20 * MiB, MiB), (42 * MiB, 128 * 1024),
              (63 * MiB, 64 * 1024)]
    if dirty != expect:
        raise Fail("QEMU's bitmap: %s" % dirty)
    inc = os.path.join(tmp, "inc1.qcow2")
    qbm("extract", "--rotate", "cbt2", "-o", inc, ov, "cbt")
    qemu_img_check(inc)
    qemu_img_check(ov)
    got = merge_extents((e["start"], e["length"]) for e in qemu_map(inc)
                        if e["present"])
    if got != expect:
        raise Fail("the incremental holds %s, the bitmap marks %s" %
                   (got, expect))
    out = os.path.join(tmp, "restored.raw")
    qbm("restore", "-o", out, backup0, inc)
    if not same(out, ov) or not same(out, disk, "-f", "raw", "-F", "raw"):
        raise Fail("backup0 + inc1 is not the disk")
    # The next round records in cbt2; cbt keeps recording too, as libvirt
    # keeps every checkpoint's bitmap enabled.
    qemu_io(ov, "write -P 0x44 30M 64k")
    if dirty_map(ov, "cbt2") != [(30 * MiB, 64 * 1024)]:
        raise Fail("cbt2 after the rotation: %s" % dirty_map(ov, "cbt2"))
    if dirty_map(ov, "cbt") != sorted(expect + [(30 * MiB, 64 * 1024)]):
        raise Fail("cbt after the rotation: %s" % dirty_map(ov, "cbt"))


def relative_name(qbm, tmp):
    """A relative data file name is opened from the working directory, as
    QEMU opens it; from elsewhere qbm reads what QEMU reads there, or says
    where it looked."""
    size = 4 * MiB
    a = os.path.join(tmp, "a")
    b = os.path.join(tmp, "b")
    os.mkdir(a)
    os.mkdir(b)
    ov = os.path.join(a, "ov.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=disk.raw",
             "ov.qcow2", str(size), cwd=a)
    qemu_io("ov.qcow2", "write -P 0x11 0 1M", "write -z 1M 64k", cwd=a)
    # Another disk.raw in b, with other data.
    qemu_img_create(os.path.join(b, "disk.raw"), size, fmt="raw")
    qemu_io(os.path.join(b, "disk.raw"), "write -P 0x22 0 2M", fmt="raw")
    outs = {}
    for d in (a, b):
        out = os.path.join(tmp, "out-%s.raw" % os.path.basename(d))
        run([os.path.abspath(qbm.path), "restore", "-o", out, ov], cwd=d)
        if qemu_img("compare", "-f", "raw", "-F", "qcow2", out, ov, cwd=d,
                    ok=None).returncode != 0:
            raise Fail("restore run in %s differs from what QEMU reads "
                       "there" % d)
        outs[d] = open(out, "rb").read()
    if outs[a] == outs[b]:
        raise Fail("the data file was not looked up in the working "
                   "directory")
    p = run([os.path.abspath(qbm.path), "restore", "-o", os.path.join(tmp, "out.raw"), ov],
            cwd=tmp, ok=(1,))
    if (ov not in p.stderr or "disk.raw" not in p.stderr or
            tmp not in p.stderr or p.stdout):
        raise Fail("missing relative data file: %r" % p.stderr)
    if os.path.exists(os.path.join(tmp, "out.raw")):
        raise Fail("a refused restore left its output")


def missing(qbm, tmp):
    """Every reading command refuses an image whose data file is missing,
    names both files, and writes nothing."""
    size = 8 * MiB
    data = os.path.join(tmp, "disk.data")
    ov = os.path.join(tmp, "ov.qcow2")
    qemu_img_create(ov, size, opts="data_file=" + data)
    qemu_io(ov, "write -P 7 0 1M")
    qemu_img("bitmap", "--add", ov, "b")
    qemu_io(ov, "write -P 8 2M 64k")
    full = os.path.join(tmp, "full.qcow2")
    qemu_img_create(full, size)
    qemu_io(full, "write -P 9 0 4M")
    os.rename(data, data + ".away")
    keep = {f: open(f, "rb").read() for f in (ov, full)}
    out = os.path.join(tmp, "out.img")
    cases = [
        ["restore", "-o", out, ov],
        ["restore", "-O", "qcow2", "-o", out, full, ov],
        ["extract", "-o", out, ov, "b"],
        ["extract", "--full", "-o", out, ov],
        ["extract", "--rotate", "b2", "-o", out, ov, "b"],
        ["consolidate", full, ov],
    ]
    for args in cases:
        p = qbm(*args, ok=(1,))
        if ov not in p.stderr or data not in p.stderr or p.stdout:
            raise Fail("%s: %r" % (" ".join(args[:1]), p.stderr))
        left = outputs_left(tmp, ["out"])
        if left:
            raise Fail("%s left %s" % (args[0], left))
        for f, content in keep.items():
            if open(f, "rb").read() != content:
                raise Fail("%s changed %s" % (args[0], f))


def ofd_locked(path):
    """Whether some process holds an OFD lock on path (QEMU's lock
    bytes), as /proc/locks lists them."""
    st = os.stat(path)
    dev = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev),
                            st.st_ino)
    with open("/proc/locks") as f:
        return any("OFDLCK" in line and dev in line for line in f)


def locked(qbm, tmp):
    """The data file is opened with the image's read locks: a writer
    holding it keeps qbm from reading it."""
    size = 4 * MiB
    data = os.path.join(tmp, "disk.data")
    ov = os.path.join(tmp, "ov.qcow2")
    qemu_img_create(ov, size, opts="data_file=" + data)
    qemu_io(ov, "write -P 7 0 1M")
    p = subprocess.Popen(["qemu-io", "-f", "raw", data],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ofd_locked(data):
            if time.monotonic() > deadline:
                raise Fail("qemu-io never locked the data file")
            time.sleep(0.05)
        out = os.path.join(tmp, "out.raw")
        r = qbm("restore", "-o", out, ov, ok=(1,))
        if data not in r.stderr or "lock" not in r.stderr:
            raise Fail("restore while a writer holds the data file: %r" %
                       r.stderr)
        if os.path.exists(out):
            raise Fail("a refused restore left its output")
    finally:
        p.communicate(b"quit\n")
    qbm("restore", "-o", os.path.join(tmp, "out.raw"), ov)


def compressed(qbm, tmp):
    """A compressed cluster in an image with a data file is corruption
    (QEMU never writes one there), reported with its L2 table."""
    ov = os.path.join(tmp, "ov.qcow2")
    qemu_img_create(ov, 4 * MiB,
                    opts="data_file=" + os.path.join(tmp, "disk.data"))
    qemu_io(ov, "write -P 7 0 64k")
    q = Qcow2(ov)
    l2 = q.l1_table()[0] & OFFSET_MASK
    with open(ov, "r+b") as f:
        f.seek(l2)
        entry = int.from_bytes(f.read(8), "big")
        f.seek(l2)
        f.write((entry | (1 << 62)).to_bytes(8, "big"))
    p = qbm("restore", "-o", os.path.join(tmp, "out.raw"), ov, ok=(1,))
    want = "L2 table at 0x%x, entry 0: compressed cluster with an " \
           "external data file" % l2
    if want not in p.stderr:
        raise Fail("compressed cluster: %r" % p.stderr)


def set_data_file_name(img, name):
    """Patch the data file name extension of img in place; the new name
    has the length of the old one, so nothing else moves."""
    ext = Qcow2(img).extension(EXT_DATA_FILE)
    if ext is None or ext.length != len(name):
        raise Fail("%s: no data file name of %d bytes" % (img, len(name)))
    with open(img, "r+b") as f:
        f.seek(ext.data)
        f.write(name.encode())


def names(qbm, tmp):
    """A data file name is a local file name, never parsed for a protocol
    (file:, nbd:, json:), as QEMU opens it; a directory, or the data file
    bit without a name, is refused before any output exists."""
    size = 4 * MiB
    ov = os.path.join(tmp, "ov.qcow2")
    # A 16-byte relative name, created and written from tmp.
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             "data_file=abcdefghijkl.raw", "ov.qcow2", str(size), cwd=tmp)
    qemu_io("ov.qcow2", "write -P 3 0 1M", "write -z 1M 64k", cwd=tmp)
    qbm_path = os.path.abspath(qbm.path)
    out = os.path.join(tmp, "out.raw")
    current = os.path.join(tmp, "abcdefghijkl.raw")
    for name in ("file:abcdefg.raw", "nbd:localhost:99",
                 'json:{"a":"bcd"}'):
        set_data_file_name(ov, name)
        p = run([qbm_path, "restore", "-o", out, ov], cwd=tmp, ok=(1,))
        if (name not in p.stderr or "No such file" not in p.stderr or
                ov not in p.stderr or p.stdout or os.path.exists(out)):
            raise Fail("data file %r missing: %r" % (name, p.stderr))
        path = os.path.join(tmp, name)
        os.rename(current, path)
        current = path
        run([qbm_path, "restore", "-o", out, ov], cwd=tmp)
        if qemu_img("compare", "-f", "raw", "-F", "qcow2", out, ov,
                    cwd=tmp, ok=None).returncode != 0:
            raise Fail("data file %r is not read as QEMU reads it" % name)
        os.unlink(out)
    os.mkdir(os.path.join(tmp, "dir-abcdefghijkl"))
    set_data_file_name(ov, "dir-abcdefghijkl")
    p = run([qbm_path, "restore", "-o", out, ov], cwd=tmp, ok=(1,))
    if ("dir-abcdefghijkl" not in p.stderr or "is a directory" not in
            p.stderr or os.path.exists(out)):
        raise Fail("a directory as data file: %r" % p.stderr)
    # The external data file bit without a name: QEMU needs data-file=.
    plain = os.path.join(tmp, "plain.qcow2")
    qemu_img_create(plain, size)
    with open(plain, "r+b") as f:
        f.seek(72)
        f.write((4).to_bytes(8, "big"))
    p = qbm("restore", "-o", out, plain, ok=(1,))
    if "no data file name" not in p.stderr or os.path.exists(out):
        raise Fail("data file bit without a name: %r" % p.stderr)


FIXED = [
    ("KubeVirt-style overlay", kubevirt),
    ("relative data file name", relative_name),
    ("missing data file", missing),
    ("data file held by a writer", locked),
    ("compressed cluster with a data file", compressed),
    ("data file names as QEMU reads them", names),
]


def main():
    suite = Suite("datafile", __doc__, seeded=True)
    suite.parser.add_argument("--rounds", type=int, default=10)
    args = suite.start()
    for rnd in suite.indices(args.rounds + len(FIXED)):
        if rnd >= args.rounds:
            name, fn = FIXED[rnd - args.rounds]
            suite.case(name, lambda tmp: fn(suite.qbm, tmp), index=rnd)
            continue
        desc = []
        suite.case(lambda: "round %d (seed %d; %s)" % (rnd, suite.seed,
                                                       "; ".join(desc)),
                   lambda tmp: scenario(suite.qbm, tmp, suite.rng(rnd),
                                        desc), index=rnd)
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
