#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""qbm rebuild and qbm verify: a disk compared with its backups.

A disk changes in random steps (data, compressed and zero writes, discards,
rewrites of the bytes already there); a full backup (qcow2 by `qbm extract
--full`, or raw) and a chain of incrementals (`qbm extract --rotate`) are
taken along the way, then more steps follow and the checkpoint is lost: left
in use as by a crash, removed, or kept. The test computes on its own which
granules truly differ: both sides read raw by QEMU (`qemu-img convert` of
the disk, and of the backups linked into a chain with `qemu-img rebase -u`),
compared granule by granule. After `qbm rebuild`, QEMU's dirty map of the
bitmap (qemu-nbd -r -B + nbdinfo) must be exactly those granules, the bitmap
enabled with the expected granularity, `qemu-img check` clean, and an
incremental extracted from it, restored over the earlier backups, must give
the disk (`qemu-img compare`). `qbm verify` must report exactly the
differing 512-byte sectors (exit 2, or 0 when none), and with --bitmap only
those the bitmap leaves clean. Refusals (sizes, missing or corrupt inputs,
the disk held by qemu-io or qemu-nbd, bad granularities, the disk given as
a backup) must leave every file as it was. Two fixed cases take an image
with an external data file (a metadata-only overlay on a raw disk, and a
plain data file with a full backup that has one too): both sides' guest
data must be read from the data files. Seeded; QBM_TEST_SEED reproduces a
run.
"""
import hashlib
import json
import mmap
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (MiB, Fail, RandomWriter, Suite,  # noqa: E402
                     dirty_map, holding, merge_extents, overlay_on_disk,
                     qemu_bitmaps, qemu_img, qemu_img_check, qemu_img_compare,
                     qemu_img_create, qemu_img_info, qemu_io, set_in_use)


def raw_of(src, dst, fmt="qcow2"):
    qemu_img("convert", "-f", fmt, "-O", "raw", src, dst)
    return dst


def backup_raw(tmp, full, incs):
    """What the backups restore to, by QEMU alone: copies of the
    incrementals linked over the full with qemu-img rebase -u, converted."""
    prev = full
    prev_fmt = "raw" if full.endswith(".raw") else "qcow2"
    for i, inc in enumerate(incs):
        c = os.path.join(tmp, "link%d.qcow2" % i)
        shutil.copyfile(inc, c)
        qemu_img("rebase", "-u", "-b", os.path.basename(prev), "-F",
                 prev_fmt, c)
        prev, prev_fmt = c, "qcow2"
    return raw_of(prev, os.path.join(tmp, "backup.raw"), prev_fmt)


def differing(a, b, size, gran):
    """The granules of gran bytes whose bytes differ between raw files a
    and b, as merged (offset, length) extents clipped to size."""
    out = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        ma = mmap.mmap(fa.fileno(), 0, prot=mmap.PROT_READ)
        mb = mmap.mmap(fb.fileno(), 0, prot=mmap.PROT_READ)
        step = max(gran, MiB)
        for big in range(0, size, step):
            end = min(big + step, size)
            if ma[big:end] == mb[big:end]:
                continue
            for off in range(big, end, gran):
                e = min(off + gran, size)
                if ma[off:e] != mb[off:e]:
                    out.append((off, e - off))
        ma.close()
        mb.close()
    return merge_extents(out)


def subtract(extents, minus):
    """extents less the ranges of minus (both sorted, merged)."""
    out = []
    for off, length in extents:
        s, e = off, off + length
        for mo, ml in minus:
            if mo + ml <= s or mo >= e:
                continue
            if mo > s:
                out.append((s, mo - s))
            s = max(s, mo + ml)
        if s < e:
            out.append((s, e - s))
    return out


def verify_extents(qbm, *args):
    """qbm verify --output=json ARGS: (exit, extents)."""
    p = qbm("verify", "--output=json", *args, ok=(0, 2))
    try:
        d = json.loads(p.stdout)
    except ValueError:
        raise Fail("qbm verify %s: exit %d, no JSON on stdout: %s" % (
            " ".join(args), p.returncode, p.stderr.strip())) from None
    ext = [(e["offset"], e["length"]) for e in d["extents"]]
    if d["differing-bytes"] != sum(x[1] for x in ext):
        raise Fail("verify: differing-bytes %d is not the sum of its "
                   "extents" % d["differing-bytes"])
    return p.returncode, ext


def scenario(qbm, tmp, rng, desc):
    size = rng.choice([16, 48, 130]) * MiB + rng.choice([0, 512, 65536])
    opts = rng.choice(["cluster_size=65536", "cluster_size=4096",
                       "compression_type=zstd", "extended_l2=on",
                       "cluster_size=2M", "refcount_bits=1"])
    cluster = {"cluster_size=4096": 4096, "cluster_size=2M": 2 * MiB}.get(
        opts, 65536)
    disk = os.path.join(tmp, "disk.qcow2")
    qemu_img_create(disk, size, opts=opts)
    gran = rng.choice([512, 4096, 65536, MiB])
    desc.append("size %d, %s, granularity %d" % (size, opts, gran))
    w = RandomWriter(disk, size, cluster, rng,
                     compress="extended_l2" not in opts)

    w.step(6)
    qbm("add", "-g", str(gran), disk, "ck0")
    if rng.random() < 0.5:
        full = os.path.join(tmp, "full.qcow2")
        qbm("extract", "--full", "-o", full, disk)
    else:
        full = raw_of(disk, os.path.join(tmp, "full.raw"))
    incs = []
    nincs = rng.randint(0, 3)
    for i in range(1, nincs + 1):
        w.step(rng.randint(1, 5), rewrite_dir=tmp)
        inc = os.path.join(tmp, "inc%d.qcow2" % i)
        qbm("extract", "--rotate", "ck%d" % i, "-o", inc, disk,
            "ck%d" % (i - 1))
        incs.append(inc)
    ck = "ck%d" % nincs
    # A bitmap that records only part of what follows, for verify --bitmap.
    qemu_img("bitmap", "--add", disk, "partial")
    w.step(rng.randint(0, 4), rewrite_dir=tmp)
    qemu_img("bitmap", "--disable", disk, "partial")
    w.step(rng.randint(1, 6), rewrite_dir=tmp)
    fate = rng.choice(["in-use", "removed", "kept"])
    if fate == "in-use":
        set_in_use(disk, ck)
    elif fate == "removed":
        qbm("remove", disk, ck)
    g_opt = rng.choice([None, 512, 65536, MiB])
    expect_gran = g_opt or (gran if fate != "removed" else
                            min(max(cluster, 4096), 65536))
    desc.append("%d incrementals, checkpoint %s, -g %s" % (nincs, fate,
                                                            g_opt))

    # The truth, computed apart from qbm.
    disk_raw = raw_of(disk, os.path.join(tmp, "disk.raw"))
    back_raw = backup_raw(tmp, full, incs)
    truth = differing(disk_raw, back_raw, size, expect_gran)
    sectors = differing(disk_raw, back_raw, size, 512)

    # verify before the rebuild: every differing sector; with --bitmap,
    # those 'partial' (QEMU's view of it) leaves clean.
    rc, got = verify_extents(qbm, disk, full, *incs)
    if got != sectors or rc != (2 if sectors else 0):
        raise Fail("verify: exit %d, extents %s, expected %s" %
                   (rc, got[:8], sectors[:8]))
    partial = dirty_map(disk, "partial")
    rc, got = verify_extents(qbm, "--bitmap", "partial", disk, full, *incs)
    want = subtract(sectors, partial)
    if got != want or rc != (2 if want else 0):
        raise Fail("verify --bitmap partial: exit %d, extents %s, expected "
                   "%s" % (rc, got[:8], want[:8]))

    # rebuild: first a dry run, which writes nothing.
    before = hashlib.sha256(open(disk, "rb").read()).hexdigest()
    gargs = ["-g", str(g_opt)] if g_opt else []
    p = qbm("rebuild", "--dry-run", *gargs, disk, ck, full, *incs)
    want_bytes = sum(x[1] for x in truth)
    if "%d dirty bytes" % want_bytes not in p.stdout:
        raise Fail("rebuild --dry-run: %r, expected %d dirty bytes" %
                   (p.stdout, want_bytes))
    if hashlib.sha256(open(disk, "rb").read()).hexdigest() != before:
        raise Fail("rebuild --dry-run changed the image")
    p = qbm("rebuild", "-p", *gargs, disk, ck, full, *incs)
    if "100.00/100%" not in p.stderr or p.stdout:
        raise Fail("rebuild -p: stdout %r, no final progress in %r" %
                   (p.stdout, p.stderr[-200:]))
    qemu_img_check(disk)
    bm = qemu_bitmaps(disk)
    if bm.get(ck) != (expect_gran, ["auto"]):
        raise Fail("after rebuild, QEMU lists %s as %s, expected "
                   "granularity %d, enabled" % (ck, bm.get(ck), expect_gran))
    got = dirty_map(disk, ck)
    if got != truth:
        raise Fail("QEMU's dirty map of %s: %s, expected %s" %
                   (ck, got[:8], truth[:8]))
    rc, got = verify_extents(qbm, "--bitmap", ck, disk, full, *incs)
    if rc != 0 or got:
        raise Fail("verify --bitmap %s after rebuild: exit %d, %s" %
                   (ck, rc, got[:8]))
    # The rebuilt checkpoint gives the next incremental.
    nxt = os.path.join(tmp, "next.qcow2")
    qbm("extract", "-o", nxt, disk, ck)
    out = os.path.join(tmp, "out.raw")
    qbm("restore", "-o", out, full, *incs, nxt)
    if not qemu_img_compare(out, disk):
        raise Fail("restore over the rebuilt incremental differs from the "
                   "disk")


def data_file(qbm, tmp, mode):
    """An IMAGE with an external data file: a metadata-only overlay
    (data_file_raw=on) on a raw disk that holds data, as KubeVirt's
    changed-block tracking, or a plain data file whose full backup is a
    qcow2 image with a data file of its own. Guest writes through the
    image (rewrites of the bytes there too), an incremental, more writes,
    the checkpoint left in use; verify and rebuild must read the guest data
    from the data files: the result judged against QEMU's reading of both
    sides, as in the scenarios."""
    size = 64 * MiB
    ov = os.path.join(tmp, "disk.qcow2")
    if mode == "raw":
        disk = os.path.join(tmp, "disk.img")
        qemu_img_create(disk, size, fmt="raw")
        qemu_io(disk, "write -P 0x5a 0 16M", "write -P 0x6b 40M 3M",
                fmt="raw")
        overlay_on_disk(tmp, disk, ov, size)
    else:
        qemu_img_create(ov, size, opts="data_file=" +
                        os.path.join(tmp, "disk.data"))
        qemu_io(ov, "write -P 0x5a 0 16M", "write -P 0x6b 40M 3M")
    qemu_img("bitmap", "--add", ov, "ck0")
    if mode == "raw":
        full = raw_of(ov, os.path.join(tmp, "full.raw"))
    else:
        full = os.path.join(tmp, "full.qcow2")
        qemu_img("convert", "-f", "qcow2", "-O", "qcow2", "-o",
                 "data_file=" + os.path.join(tmp, "full.data"), ov, full)
        if "data-file" not in json.dumps(qemu_img_info(full)):
            raise Fail("the full backup has no data file")
    qemu_io(ov, "write -P 0x11 1M 64k", "write -P 0x22 20M 1M",
            "write -z 42M 128k", "discard 8M 64k")
    inc = os.path.join(tmp, "inc1.qcow2")
    qbm("extract", "--rotate", "ck1", "-o", inc, ov, "ck0")
    # 0x5a at 0 rewrites the bytes there: not a difference.
    qemu_io(ov, "write -P 0x5a 0 64k", "write -P 0x33 63M 4k",
            "write -P 0x44 30M 100k", "write -z 40M 64k")
    set_in_use(ov, "ck1")

    # The truth: both sides as QEMU reads them.
    truth = differing(raw_of(ov, os.path.join(tmp, "disk-now.raw")),
                      backup_raw(tmp, full, [inc]), size, 65536)
    sectors = differing(os.path.join(tmp, "disk-now.raw"),
                        os.path.join(tmp, "backup.raw"), size, 512)
    if not truth or truth[0][0] == 0:
        raise Fail("the writes make no difference, or the rewrite does")
    rc, got = verify_extents(qbm, ov, full, inc)
    if got != sectors or rc != 2:
        raise Fail("verify: exit %d, extents %s, expected %s" %
                   (rc, got[:8], sectors[:8]))
    qbm("rebuild", ov, "ck1", full, inc)
    qemu_img_check(ov)
    if qemu_bitmaps(ov).get("ck1") != (65536, ["auto"]):
        raise Fail("after rebuild: %s" % qemu_bitmaps(ov))
    got = dirty_map(ov, "ck1")
    if got != truth:
        raise Fail("QEMU's dirty map of ck1: %s, expected %s" % (got, truth))
    rc, got = verify_extents(qbm, "--bitmap", "ck1", ov, full, inc)
    if rc != 0 or got:
        raise Fail("verify --bitmap ck1 after rebuild: exit %d, %s" %
                   (rc, got[:8]))


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def refusals(qbm, tmp):
    disk = os.path.join(tmp, "disk.qcow2")
    qemu_img_create(disk, 64 * MiB)
    qemu_io(disk, "write -P 1 0 1M")
    qemu_img("bitmap", "--add", disk, "ck")
    full = raw_of(disk, os.path.join(tmp, "full.raw"))
    qemu_io(disk, "write -P 2 0 64k")
    small = os.path.join(tmp, "small.qcow2")
    qemu_img_create(small, 32 * MiB)
    junk = os.path.join(tmp, "junk.qcow2")
    with open(junk, "wb") as f:
        f.write(b"QFI\xfb" + b"\xff" * 200)
    huge = os.path.join(tmp, "huge.qcow2")
    huge_full = os.path.join(tmp, "huge-full.qcow2")
    qemu_img_create(huge, "16T")
    qemu_img_create(huge_full, "16T")
    missing = os.path.join(tmp, "missing.qcow2")
    cases = [
        ([disk, small], [], "virtual size"),
        ([disk, full, small], [], "virtual size"),
        ([disk, missing], [], "missing.qcow2"),
        ([disk, full, junk], [], "junk.qcow2"),
        ([disk, disk], [], "also given as a backup"),
        ([disk, full, full], [], "twice"),
        ([disk, full], ["-g", "3000"], "power of two"),
        ([disk, full], ["-g", "256"], "power of two"),
        ([disk, full], ["-g", "4G"], "power of two"),
        ([huge, huge_full], ["-g", "512"], "larger granularity"),
    ]
    files = [disk, full, small, junk, huge, huge_full]
    for args, opts, word in cases:
        sums = {f: sha(f) for f in files}
        for cmd in (["rebuild"] + opts + [args[0], "ck"] + args[1:],
                    ["verify"] + args):
            if cmd[0] == "verify" and opts:
                continue
            p = qbm(*cmd, ok=(1,))
            if word not in p.stderr or p.stdout:
                raise Fail("%s: refusal without a clear message (%r): %r"
                           % (" ".join(cmd[:1] + opts), word, p.stderr))
        changed = [f for f in files if sha(f) != sums[f]]
        if changed:
            raise Fail("a refused command changed %s" % changed)
    # The disk in use by a running VM: qemu-io, or qemu-nbd without -r.
    for tool in ("qemu-io", "qemu-nbd"):
        with holding(disk, tool):
            # Wait for QEMU to mark the bitmap in use: it writes the file
            # (and qemu-img info -U may read it half written meanwhile).
            for _ in range(600):
                try:
                    flags = qemu_bitmaps(disk, force_share=True)["ck"][1]
                    if "in-use" in flags:
                        break
                except (Fail, KeyError, ValueError):
                    pass
                time.sleep(0.05)
            else:
                raise Fail("%s never marked bitmap ck in use" % tool)
            before = sha(disk)
            for cmd in (["rebuild", disk, "ck", full],
                        ["verify", disk, full]):
                p = qbm(*cmd, ok=(1,))
                if "lock" not in p.stderr or p.stdout:
                    raise Fail("%s with %s holding the disk: %r" %
                               (cmd[0], tool, p.stderr))
            if sha(disk) != before:
                raise Fail("rebuild changed a disk %s holds" % tool)
            # -U reads it anyway, as qemu-img -U does (the first 64 KiB
            # changed since the full backup).
            p = qbm("verify", "-U", disk, full, ok=(2,))
            if "0 65536" not in p.stdout.splitlines():
                raise Fail("verify -U with %s holding the disk: %r" %
                           (tool, p.stdout))
    # A backup a QEMU writer holds: verify -U reads it too, without locks
    # (as restore -U does); without -U verify and rebuild refuse it.
    inc = os.path.join(tmp, "inc.qcow2")
    qemu_img_create(inc, 64 * MiB)
    qemu_io(inc, "write -P 2 0 64k")
    with holding(inc, "qemu-io"):
        before = (sha(disk), sha(inc))
        for cmd in (["rebuild", disk, "ck", full, inc],
                    ["verify", disk, full, inc]):
            p = qbm(*cmd, ok=(1,))
            if "lock" not in p.stderr or "inc.qcow2" not in p.stderr:
                raise Fail("%s with a held backup: %r" % (cmd[0], p.stderr))
        p = qbm("verify", "-U", disk, full, inc, ok=(0,))
        if p.stdout.splitlines()[1:]:
            raise Fail("verify -U with a held backup: %r" % p.stdout)
        if (sha(disk), sha(inc)) != before:
            raise Fail("a command changed the disk or a held backup")
    # Misuse.
    qbm("rebuild", disk, "ck", ok=(2,))
    qbm("verify", disk, ok=(2,))
    qbm("rebuild", "-g", "x", disk, "ck", full, ok=(2,))


def main():
    suite = Suite("rebuild", __doc__, seeded=True)
    suite.parser.add_argument("--scenarios", type=int, default=10)
    args = suite.start()
    for i in suite.indices(args.scenarios + 3):
        desc = []
        if i == args.scenarios:
            desc.append("refusals")
            fn = lambda tmp: refusals(suite.qbm, tmp)  # noqa: E731
        elif i > args.scenarios:
            mode = ["raw", "plain"][i - args.scenarios - 1]
            desc.append("an image with a data file (data_file_raw %s)" %
                        ("on" if mode == "raw" else "off"))
            fn = lambda tmp, mode=mode: data_file(  # noqa: E731
                suite.qbm, tmp, mode)
        else:
            fn = lambda tmp: scenario(suite.qbm, tmp,  # noqa: E731
                                      suite.rng(i), desc)
        suite.case(lambda: "case %d (seed %d; %s)" % (i, suite.seed,
                                                      "; ".join(desc)),
                   fn, index=i)
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
