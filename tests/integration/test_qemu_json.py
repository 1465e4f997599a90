#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""`qbm info --output=json` against `qemu-img info --output=json` (issue 14
item 2), on random images: compat 0.10 or 1.1, cluster size, refcount
width, extended L2, zstd, lazy refcounts, an external data file (raw or
not), a backing file, internal snapshots, bitmaps (enabled or not, in use,
a stale extension) whose names hold bytes that are not UTF-8, control
characters, quotes and characters past the BMP; encrypted images (LUKS
with several ciphers, modes, IV generators and hashes; legacy AES).

- `format-specific` is exactly qemu-img's object (same keys, types and
  values);
- every other key of qemu-img's object is in qbm's with qemu-img's type
  and value (`snapshots`: qemu-img's array, `actual-size`, ...);
- `--chain` against `qemu-img info --backing-chain`, layer by layer;
- human output shows control characters and bytes that are not UTF-8 as
  \\xNN, never raw.
"""
import json
import os
import struct
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (Fail, KiB, MiB, Suite, qemu_img,  # noqa: E402
                     qemu_img_create, qemu_io, set_bitmap_in_use)

# Pieces of bitmap and snapshot names: plain, quotes and backslashes,
# control characters, UTF-8 (2, 3 and 4 bytes), and byte strings QEMU's
# JSON writer takes as U+FFFD or as NUL (0xc0 0x80): a stray continuation,
# 0xff, a cut sequence, an overlong form, a surrogate, a noncharacter.
PIECES = [b"ck", b"x", b"-1", b'"q"', b"back\\slash", b"\x07", b"\x1b[31m",
          b"\x7f", "é".encode(), "€".encode(), "😀".encode(), b"\x80",
          b"\xff", b"\xc3", b"\xe2\x82", b"\xc0\x80", b"\xc1\xbf",
          b"\xed\xa0\x80", b"\xef\xbf\xbf", b"\xf4\x90\x80\x80", b"\xfe",
          b"\xc2\x85"]


def random_name(rng, used):
    while True:
        name = b"".join(rng.choice(PIECES)
                        for _ in range(rng.randint(1, 4)))
        if name not in used and not name.startswith(b"-"):
            used.add(name)
            return os.fsdecode(name)


def strict_equal(a, b):
    """JSON values equal in type and value (True is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(strict_equal(a[k], b[k])
                                            for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_equal(x, y)
                                        for x, y in zip(a, b))
    return a == b


def compare(qbm_obj, qemu_obj, where):
    """Every key of qemu-img's object in qbm's, equal; format-specific
    exactly equal."""
    for key, want in qemu_obj.items():
        if key not in qbm_obj:
            raise Fail("%s: key %r missing (qemu-img: %s)"
                       % (where, key, json.dumps(want)))
        if not strict_equal(qbm_obj[key], want):
            raise Fail("%s: key %r: qbm %s, qemu-img %s"
                       % (where, key, json.dumps(qbm_obj[key]),
                          json.dumps(want)))


def set_header_bit(path, offset, bit):
    with open(path, "r+b") as f:
        f.seek(offset)
        word = struct.unpack(">Q", f.read(8))[0]
        f.seek(offset)
        f.write(struct.pack(">Q", word | bit))


def clear_header_bit(path, offset, bit):
    with open(path, "r+b") as f:
        f.seek(offset)
        word = struct.unpack(">Q", f.read(8))[0]
        f.seek(offset)
        f.write(struct.pack(">Q", word & ~bit))


INCOMPAT, AUTOCLEAR = 72, 88


def scenario(suite, tmp, rng):
    qbm = suite.qbm
    size = rng.choice([1, 16, 64, 1000]) * MiB + rng.choice([0, 0, 512])
    v3 = rng.random() < 0.8
    opts = ["compat=1.1" if v3 else "compat=0.10"]
    cluster = rng.choice([4, 16, 64, 64, 256, 2048]) * KiB
    opts.append("cluster_size=%d" % cluster)
    backing = data_file = None
    if v3:
        opts.append("refcount_bits=%d" % rng.choice([1, 2, 4, 8, 16, 32,
                                                     64]))
        if cluster >= 16 * KiB and rng.random() < 0.3:
            opts.append("extended_l2=on")
        if rng.random() < 0.3:
            opts.append("compression_type=zstd")
        if rng.random() < 0.3:
            opts.append("lazy_refcounts=on")
        if rng.random() < 0.25:
            data_file = "data.raw"
            opts.append("data_file=" + data_file)
            if rng.random() < 0.5:
                opts.append("data_file_raw=on")
    backing_fmt = "qcow2"
    if rng.random() < 0.4 and "data_file_raw=on" not in opts:
        # A raw layer has only a few keys, as in qemu-img's chain.
        backing_fmt = rng.choice(["qcow2", "qcow2", "raw"])
        backing = "base." + backing_fmt
        qemu_img_create(os.path.join(tmp, backing), size, fmt=backing_fmt)
    img = os.path.join(tmp, "top.qcow2")
    # QEMU opens a relative data file name from the working directory.
    cmd = ["create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
    if backing:
        cmd += ["-b", backing, "-F", backing_fmt]
    run_in = dict(cwd=tmp)
    qemu_img(*(cmd + [img, str(size)]), **run_in)
    if rng.random() < 0.5:
        qemu_io(img, "write -P 7 0 %d" % min(size, 3 * cluster), cwd=tmp)
    used = set()
    names = []
    if v3:
        for _ in range(rng.randint(0, 4)):
            name = random_name(rng, used)
            args = ["bitmap", "--add"]
            if rng.random() < 0.3:
                args.append("--disable")
            if rng.random() < 0.5:
                args += ["-g", str(rng.choice([512, 4096, 65536,
                                               1 << 20]))]
            qemu_img(*(args + [img, name]), cwd=tmp)
            names.append(name)
    if not data_file:
        for _ in range(rng.choice([0, 0, 1, 2])):
            # QEMU refuses some names (EINVAL): then there is one less.
            qemu_img("snapshot", "-c", random_name(rng, used), img,
                     cwd=tmp, ok=(0, 1))
    for name in names:
        if rng.random() < 0.25:
            set_bitmap_in_use(img, name)
    if v3 and names and rng.random() < 0.15:
        clear_header_bit(img, AUTOCLEAR, 1)  # a stale extension
    if v3 and rng.random() < 0.1:
        set_header_bit(img, INCOMPAT, 2)  # corrupt
    elif v3 and "lazy_refcounts=on" in opts and rng.random() < 0.2:
        set_header_bit(img, INCOMPAT, 1)  # dirty
    what = "%s, %d bitmaps%s" % (",".join(opts), len(names),
                                 ", backing" if backing else "")

    want = json.loads(qemu_img("info", "--output=json", "-U", img,
                               cwd=tmp).stdout)
    got = json.loads(qbm("info", "--output=json", "-U", img).stdout)
    if "format-specific" not in got:
        raise Fail("%s: no format-specific object" % what)
    compare(got, want, what)
    if not strict_equal(got["format-specific"], want["format-specific"]):
        raise Fail("%s: format-specific: qbm %s, qemu-img %s"
                   % (what, json.dumps(got["format-specific"]),
                      json.dumps(want["format-specific"])))
    if not isinstance(got.get("snapshots"), list):
        raise Fail("%s: snapshots is not an array" % what)
    suite.ok()

    if backing:
        wants = json.loads(qemu_img("info", "--output=json", "-U",
                                    "--backing-chain", img,
                                    cwd=tmp).stdout)
        gots = json.loads(qbm("info", "--output=json", "-U", "--chain",
                              img).stdout)
        if len(wants) != len(gots):
            raise Fail("%s: --chain: %d layers, qemu-img %d"
                       % (what, len(gots), len(wants)))
        for i, (g, w) in enumerate(zip(gots, wants)):
            compare(g, w, "%s: --chain layer %d" % (what, i))
        suite.ok()

    # Human output: no control character and no byte that is not UTF-8
    # reaches the terminal.
    raw = run_bytes([qbm.path, "info", "-U", img])
    for b in raw:
        if b < 0x20 and b not in (0x0a,) or b == 0x7f:
            raise Fail("%s: human output holds the control byte 0x%02x"
                       % (what, b))
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Fail("%s: human output is not UTF-8: %s" % (what, e))


def run_bytes(cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise Fail("%s: exit %d: %s" % (cmd, p.returncode, p.stderr))
    return p.stdout


def escapes(suite, tmp):
    """A name with BEL and a byte that is not UTF-8 shows as \\x07 and
    \\xff in `info`, `dump` and `check`, in dry-run plans and in error
    messages; JSON has U+0007 and U+FFFD, as qemu-img."""
    qbm = suite.qbm
    img = qemu_img_create(os.path.join(tmp, "a.qcow2"), MiB)
    name = os.fsdecode(b"b\x07\xffz")
    qemu_img("bitmap", "--add", img, name)
    text = run_bytes([qbm.path, "info", img]).decode(errors="replace")
    if "b\\x07\\xffz:" not in text:
        raise Fail("info: the name is not shown as b\\x07\\xffz: %r" % text)
    text = run_bytes([qbm.path, "dump", img, name]).decode(
        errors="replace")
    if "bitmap b\\x07\\xffz," not in text:
        raise Fail("dump: the name is not shown as b\\x07\\xffz: %r" % text)
    set_bitmap_in_use(img, name)
    p = subprocess.run([qbm.path, "check", img], stdout=subprocess.PIPE)
    text = p.stdout.decode(errors="replace")
    if "'b\\x07\\xffz'" not in text or b"\x07" in p.stdout:
        raise Fail("check: the name is not shown as b\\x07\\xffz: %r"
                   % text)
    # A dry-run plan and an error message on stderr.
    p = subprocess.run([qbm.path, "rename", "-n", img, name, "c\x07"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0 or b"\x07" in p.stdout or \
            b"'c\\x07'" not in p.stdout:
        raise Fail("rename -n: the plan is %r" % p.stdout)
    p = subprocess.run([qbm.path, "dump", img, "x\x1b[31m"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 1 or b"\x1b" in p.stderr or \
            b"'x\\x1b[31m'" not in p.stderr:
        raise Fail("dump: the error is %r" % p.stderr)
    # A warning: copy skips the in-use bitmap.
    other = qemu_img_create(os.path.join(tmp, "b.qcow2"), MiB)
    p = subprocess.run([qbm.path, "copy", img, other],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0 or b"\x07" in p.stderr or \
            b"'b\\x07\\xffz'" not in p.stderr:
        raise Fail("copy: the warning is %r" % p.stderr)
    info = json.loads(qbm("info", "--output=json", img).stdout)
    want = "b\x07\ufffdz"
    if info["bitmaps"][0]["name"] != want or \
            info["format-specific"]["data"]["bitmaps"][0]["name"] != want:
        raise Fail("JSON names: %r" % info["bitmaps"])
    qinfo = json.loads(qemu_img("info", "--output=json", img).stdout)
    if qinfo["format-specific"]["data"]["bitmaps"][0]["name"] != want:
        raise Fail("qemu-img writes %r" % qinfo)


# LUKS variants (QEMU's option values), and legacy AES.
ENCRYPTIONS = [
    "encrypt.format=luks",
    "encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,"
    "encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
    "encrypt.format=luks,encrypt.cipher-alg=serpent-256,"
    "encrypt.hash-alg=sha1,encrypt.ivgen-alg=plain",
    "encrypt.format=luks,encrypt.cipher-alg=twofish-128,"
    "encrypt.cipher-mode=xts",
    "encrypt.format=aes",
]


def encrypted(suite, tmp):
    """Encrypted images: format-specific's "encrypt" object (the LUKS
    header's public fields) and "encrypted", as qemu-img writes them."""
    for i, opts in enumerate(ENCRYPTIONS):
        img = os.path.join(tmp, "e%d.qcow2" % i)
        # QEMU times its key derivation for iter-time ms; when that was
        # too quick to measure, or the measure was disturbed (a loaded
        # machine), it fails ("Unable to get accurate CPU usage"): try
        # longer, and again.
        for ms in (10, 100, 1000) * 3:
            luks = ",encrypt.iter-time=%d" % ms if "luks" in opts else ""
            p = qemu_img("create", "-q", "-f", "qcow2", "--object",
                         "secret,id=sec0,data=secret", "-o",
                         opts + luks + ",encrypt.key-secret=sec0", img, "4M",
                         ok=(0, 1))
            if p.returncode == 0 or "accurate CPU usage" not in p.stderr:
                break
        if p.returncode and "accurate CPU usage" in p.stderr:
            # QEMU could not make this input; what is tested is qbm's
            # reading of it.
            print("note: %s: qemu-img could not time its key derivation "
                  "in 9 tries; variant skipped" % opts)
            continue
        if p.returncode:
            raise Fail("qemu-img create %s: %s" % (opts, p.stderr))
        want = json.loads(qemu_img("info", "--output=json", img).stdout)
        got = json.loads(suite.qbm("info", "--output=json", img).stdout)
        compare(got, want, opts)
        if not strict_equal(got["format-specific"],
                            want["format-specific"]):
            raise Fail("%s: format-specific: qbm %s, qemu-img %s"
                       % (opts, json.dumps(got["format-specific"]),
                          json.dumps(want["format-specific"])))


def main():
    suite = Suite("qemu_json", __doc__, seeded=True)
    suite.parser.add_argument("--scenarios", type=int, default=40)
    args = suite.start()
    suite.case("escapes", lambda tmp: escapes(suite, tmp))
    suite.case("encrypted", lambda tmp: encrypted(suite, tmp))
    suite.scenarios(args.scenarios, lambda tmp, rng: scenario(suite, tmp,
                                                              rng))
    sys.exit(suite.finish())


if __name__ == "__main__":
    main()
