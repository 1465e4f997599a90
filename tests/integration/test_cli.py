#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""qbm's command line habits, as qemu-img's (issue 14 item 1).

- GNU argument order: every subcommand takes its options after its
  operands (`qbm info disk.qcow2 --output=json`), and `--` ends them (an
  image named `-x`, a bitmap named `-n`); each case checks that the option
  took effect, judged by QEMU where it changes an image;
- `-f qcow2` / `--format=qcow2` is accepted by every command that takes an
  image, any other format refused as misuse (exit 2, one `qbm:` line, the
  image unchanged byte for byte);
- `-q` prints nothing on stdout and no progress, and keeps errors and
  warnings on stderr;
- misuse is one line `qbm: CMD: ...` plus the hint `Try 'qbm help CMD'.`,
  exit 2;
- `qbm help CMD` prints CMD's help, the same as `qbm CMD --help` (which
  works after operands too), for every command;
- `qbm check -r leaks|all` as `qemu-img check -r`: `-r all` gives the same
  file as `--repair`, `-r leaks` frees the leaks and leaves an in-use
  bitmap alone; `qemu-img check` judges both.
"""
import json
import os
import shutil
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import (OFFSET_MASK, Fail, MiB, Qcow2, Suite,  # noqa: E402
                     dirty_map, qemu_bitmaps, qemu_img, qemu_img_check,
                     qemu_img_compare, qemu_img_create, qemu_img_info,
                     qemu_io, run)

SIZE = 16 * MiB

COMMANDS = ["info", "dump", "add", "remove", "clear", "enable", "disable",
            "rename", "merge", "copy", "populate", "commit-bitmaps",
            "snapshot-bitmaps", "check", "restore", "extract", "consolidate",
            "rebuild", "verify", "checkpoints"]

DOMAIN_XML = """<domain type='kvm'>
  <name>vm</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{path}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def image(tmp, name, bitmaps=(), writes=(), backing=None):
    """A 16 MiB qcow2 image with enabled bitmaps (64 KiB granularity),
    then the writes ("write 1M 64k" ...) that mark them."""
    img = os.path.join(tmp, name)
    qemu_img_create(img, SIZE, backing=backing and os.path.basename(backing))
    for b in bitmaps:
        qemu_img("bitmap", "--add", img, b)
    if writes:
        qemu_io(img, *writes)
    return img


def read(path):
    with open(path, "rb") as f:
        return f.read()


def expect(cond, what):
    if not cond:
        raise Fail(what)


# ---------------------------------------------------------------------------
# Every subcommand with its options after the operands. Each function runs
# one command with `tail` (more options) at the very end and checks that
# the options placed after the operands took effect.

def after_info(qbm, tmp, tail):
    img = image(tmp, "a.qcow2", ["b0"], ["write 1M 64k"])
    p = qbm("info", img, "--output=json", *tail)
    d = json.loads(p.stdout)
    expect(d["bitmaps"][0]["name"] == "b0" and
           d["bitmaps"][0]["dirty-bytes"] == 65536,
           "info IMAGE --output=json: %s" % p.stdout)
    d = json.loads(qbm("info", img, "--chain", "--output=json", *tail).stdout)
    expect(isinstance(d, list) and len(d) == 1, "info IMAGE --chain")


def after_dump(qbm, tmp, tail):
    img = image(tmp, "a.qcow2", ["b0"], ["write 1M 64k", "write 5M 128k"])
    d = json.loads(qbm("dump", img, "b0", "--output=json", "-U",
                       *tail).stdout)
    got = [(e["offset"], e["length"]) for e in d["extents"]]
    expect(got == dirty_map(img, "b0"),
           "dump IMAGE BITMAP --output=json: %s, QEMU: %s" %
           (got, dirty_map(img, "b0")))


def after_add(qbm, tmp, tail):
    img = image(tmp, "a.qcow2")
    qbm("add", img, "b1", "-g", "512", *tail)
    qbm("add", img, "b2", "--disabled", *tail)
    expect(qemu_bitmaps(img) == {"b1": (512, ["auto"]), "b2": (65536, [])},
           "add IMAGE NAME -g 512 / --disabled: %s" % qemu_bitmaps(img))


def after_remove(qbm, tmp, tail):
    img = image(tmp, "a.qcow2", ["b0", "b1"])
    before = read(img)
    p = qbm("remove", img, "b0", "b1", "--dry-run", *tail)
    expect(read(img) == before and "would remove bitmap 'b1'" in p.stdout,
           "remove IMAGE NAME... --dry-run changed the image or said: %s" %
           p.stdout)
    qbm("remove", img, "b0", *tail)
    expect(list(qemu_bitmaps(img)) == ["b1"], "remove IMAGE NAME")


def after_clear(qbm, tmp, tail):
    img = image(tmp, "a.qcow2", ["b0"], ["write 1M 64k"])
    p = qbm("clear", img, "b0", "-n", *tail)
    expect(dirty_map(img, "b0") == [(MiB, 65536)] and "would clear" in
           p.stdout, "clear IMAGE NAME -n cleared it")
    qbm("clear", img, "b0", *tail)
    expect(dirty_map(img, "b0") == [], "clear IMAGE NAME")


def after_enable_disable(cmd, flags):
    def fn(qbm, tmp, tail):
        img = image(tmp, "a.qcow2", ["b0"])
        if cmd == "enable":
            qemu_img("bitmap", "--disable", img, "b0")
        before = read(img)
        qbm(cmd, img, "b0", "--dry-run", *tail)
        expect(read(img) == before, "%s IMAGE NAME --dry-run wrote" % cmd)
        qbm(cmd, img, "b0", *tail)
        expect(qemu_bitmaps(img)["b0"][1] == flags, "%s IMAGE NAME: %s" %
               (cmd, qemu_bitmaps(img)))
    return fn


def after_rename(qbm, tmp, tail):
    img = image(tmp, "a.qcow2", ["b0"])
    before = read(img)
    qbm("rename", img, "b0", "c0", "-n", *tail)
    expect(read(img) == before, "rename IMAGE OLD NEW -n wrote")
    qbm("rename", img, "b0", "c0", *tail)
    expect(list(qemu_bitmaps(img)) == ["c0"], "rename IMAGE OLD NEW")


def after_merge(qbm, tmp, tail):
    src = image(tmp, "src.qcow2", ["a"], ["write 2M 64k"])
    img = image(tmp, "a.qcow2", ["t"])
    qbm("merge", img, "t", "a", "-b", src, *tail)
    expect(dirty_map(img, "t") == dirty_map(src, "a"),
           "merge IMAGE TARGET SOURCE -b SOURCE_IMAGE")


def after_copy(qbm, tmp, tail):
    src = image(tmp, "src.qcow2", ["a"], ["write 2M 64k"])
    dst = image(tmp, "dst.qcow2", ["a"], ["write 8M 64k"])
    qbm("copy", src, dst, "--replace", *tail)
    expect(dirty_map(dst, "a") == dirty_map(src, "a"),
           "copy SOURCE TARGET --replace")


def after_populate(qbm, tmp, tail):
    base = image(tmp, "base.qcow2", writes=["write 0 64k"])
    top = image(tmp, "top.qcow2", ["b0"], backing=base,
                writes=["write 4M 64k"])
    layer = image(tmp, "layer.qcow2", writes=["write 8M 64k"])
    qbm("populate", top, "b0", "--from", layer, *tail)
    expect(dirty_map(top, "b0") == [(4 * MiB, 65536), (8 * MiB, 65536)],
           "populate IMAGE NAME --from LAYER: %s" % dirty_map(top, "b0"))


def after_commit_bitmaps(qbm, tmp, tail):
    base = image(tmp, "base.qcow2", ["ck"])
    top = image(tmp, "top.qcow2", ["ck", "new", "off"], backing=base,
                writes=["write 4M 64k"])
    qemu_img("bitmap", "--disable", top, "off")
    before = read(base)
    p = qbm("commit-bitmaps", top, base, "--dry-run", *tail)
    expect(read(base) == before and "would" in p.stdout and
           "would not carry bitmap 'off'" in p.stdout,
           "commit-bitmaps TOP BASE --dry-run wrote, or carried the "
           "disabled bitmap: %s" % p.stdout)
    qbm("commit-bitmaps", top, base, "--mark-written", "--carry-disabled",
        *tail)
    expect(dirty_map(base, "new") == [(4 * MiB, 65536)],
           "commit-bitmaps TOP BASE --mark-written: %s" %
           dirty_map(base, "new"))
    # The disabled copy is carried as it is: disabled, its writes kept.
    expect(qemu_bitmaps(base).get("off") == (65536, []) and
           dirty_map(base, "off") == [(4 * MiB, 65536)],
           "commit-bitmaps TOP BASE --carry-disabled: %s" %
           qemu_bitmaps(base))


def after_snapshot_bitmaps(qbm, tmp, tail):
    base = image(tmp, "base.qcow2", ["ck"])
    top = image(tmp, "top.qcow2", backing=base, writes=["write 4M 64k"])
    qbm("snapshot-bitmaps", base, top, "--disable-base", *tail)
    expect(qemu_bitmaps(base)["ck"][1] == [] and
           dirty_map(top, "ck") == [(4 * MiB, 65536)],
           "snapshot-bitmaps BASE TOP --disable-base")


def after_check(qbm, tmp, tail):
    img = image(tmp, "a.qcow2", ["b0"])
    d = json.loads(qbm("check", img, "--output=json", "--chain",
                       *tail).stdout)
    expect(isinstance(d, list) and d[0]["corruptions"] == 0,
           "check IMAGE --output=json --chain")


def after_restore(qbm, tmp, tail):
    full = image(tmp, "full.qcow2", writes=["write -P 1 0 1M"])
    inc = image(tmp, "inc.qcow2", writes=["write -P 2 512k 64k"])
    want = image(tmp, "want.qcow2", writes=["write -P 1 0 1M",
                                            "write -P 2 512k 64k"])
    out = os.path.join(tmp, "out.qcow2")
    qbm("restore", full, inc, "-o", out, "-O", "qcow2", "--checkpoint",
        "ck", *tail)
    expect(qemu_img_info(out)["format"] == "qcow2" and
           qemu_img_compare(out, want) and "ck" in qemu_bitmaps(out),
           "restore FULL INC -o OUT -O qcow2 --checkpoint ck")


def after_extract(qbm, tmp, tail):
    prev = image(tmp, "prev.qcow2")
    img = image(tmp, "a.qcow2", ["b0"], ["write -P 3 1M 64k"])
    out = os.path.join(tmp, "out.qcow2")
    qbm("extract", img, "b0", "-o", out, "--backing", prev, *tail)
    expect(qemu_img_info(out).get("backing-filename") and
           qemu_img_compare(out, img),
           "extract IMAGE BITMAP -o OUT --backing PREVIOUS")
    out2 = os.path.join(tmp, "out2.qcow2")
    qbm("extract", img, "b0", "-o", out2, "--rotate", "b1", "--disable-old",
        *tail)
    expect(qemu_img_compare(out2, img) and
           qemu_bitmaps(img) == {"b0": (65536, []), "b1": (65536, ["auto"])},
           "extract IMAGE BITMAP -o OUT --rotate NEW --disable-old: %s" %
           qemu_bitmaps(img))


def after_consolidate(qbm, tmp, tail):
    full = image(tmp, "full.qcow2", writes=["write -P 1 0 1M"])
    inc = image(tmp, "inc.qcow2", writes=["write -P 2 512k 64k"])
    want = image(tmp, "want.qcow2", writes=["write -P 1 0 1M",
                                            "write -P 2 512k 64k"])
    p = qbm("consolidate", full, inc, "-p", *tail)
    expect(qemu_img_compare(full, want), "consolidate FULL INC -p")
    expect("100.00/100%" in p.stderr,
           "consolidate FULL INC -p showed no progress: %r" % p.stderr)


def after_rebuild(qbm, tmp, tail):
    img = image(tmp, "a.qcow2", ["ck"], ["write -P 1 0 1M"])
    full = os.path.join(tmp, "full.raw")
    qemu_img("convert", "-O", "raw", img, full)
    qemu_io(img, "write -P 2 4M 4k", "write -P 1 0 64k")
    before = read(img)
    p = qbm("rebuild", img, "ck", full, "-g", "4096", "--dry-run", *tail)
    expect(read(img) == before and ": 4096 dirty bytes" in p.stdout,
           "rebuild IMAGE NAME FULL -g 4096 --dry-run: %s" % p.stdout)
    p = qbm("rebuild", img, "ck", full, "-g", "4096", "-p", *tail)
    expect(qemu_bitmaps(img)["ck"] == (4096, ["auto"]) and
           dirty_map(img, "ck") == [(4 * MiB, 4096)],
           "rebuild IMAGE NAME FULL -g 4096: %s %s" %
           (qemu_bitmaps(img), dirty_map(img, "ck")))
    expect("100.00/100%" in p.stderr,
           "rebuild IMAGE NAME FULL -p showed no progress: %r" % p.stderr)


def after_verify(qbm, tmp, tail):
    img = image(tmp, "a.qcow2", writes=["write -P 1 0 1M"])
    full = os.path.join(tmp, "full.raw")
    qemu_img("convert", "-O", "raw", img, full)
    qemu_img("bitmap", "--add", img, "part")
    qemu_io(img, "write -P 2 4M 4k")
    qemu_img("bitmap", "--disable", img, "part")
    qemu_io(img, "write -P 3 8M 512")
    p = qbm("verify", img, full, "--output=json", "-U", *tail, ok=(2,))
    got = [(e["offset"], e["length"]) for e in json.loads(p.stdout)["extents"]]
    expect(got == [(4 * MiB, 4096), (8 * MiB, 512)],
           "verify IMAGE FULL --output=json -U: %s" % p.stdout)
    p = qbm("verify", img, full, "--bitmap", "part", *tail, ok=(2,))
    expect(p.stdout.splitlines()[1:] == ["%d 512" % (8 * MiB)],
           "verify IMAGE FULL --bitmap part: %s" % p.stdout)


def after_checkpoints(qbm, tmp, tail):
    img = image(tmp, "a.qcow2", ["orphan"])
    cpdir = os.path.join(tmp, "cp")
    os.mkdir(cpdir)
    dom = os.path.join(tmp, "domain.xml")
    with open(dom, "w") as f:
        f.write(DOMAIN_XML.format(path=img))
    p = qbm("checkpoints", cpdir, "--output=json", "--domain-xml", dom,
            *tail, ok=(2,))
    expect(p.stdout.startswith("{") and
           "orphan" in json.dumps(json.loads(p.stdout)),
           "checkpoints DIR --output=json --domain-xml FILE: %s" % p.stdout)


AFTER = [
    ("info", after_info),
    ("dump", after_dump),
    ("add", after_add),
    ("remove", after_remove),
    ("clear", after_clear),
    ("enable", after_enable_disable("enable", ["auto"])),
    ("disable", after_enable_disable("disable", [])),
    ("rename", after_rename),
    ("merge", after_merge),
    ("copy", after_copy),
    ("populate", after_populate),
    ("commit-bitmaps", after_commit_bitmaps),
    ("snapshot-bitmaps", after_snapshot_bitmaps),
    ("check", after_check),
    ("restore", after_restore),
    ("extract", after_extract),
    ("consolidate", after_consolidate),
    ("rebuild", after_rebuild),
    ("verify", after_verify),
    ("checkpoints", after_checkpoints),
]
# checkpoints takes a directory, not an image.
TAKES_IMAGE = [c for c in COMMANDS if c != "checkpoints"]


# ---------------------------------------------------------------------------
# --

def case_double_dash(qbm, tmp):
    """An image named -x and a bitmap named -n: after `--` they are
    operands, even with options before and after them."""
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        image(tmp, "-x")
        qbm("add", "./-x", "-g", "4096", "--", "-n")
        expect(qemu_bitmaps("./-x") == {"-n": (4096, ["auto"])},
               "add IMAGE -g 4096 -- -n: %s" % qemu_bitmaps("./-x"))
        d = json.loads(qbm("dump", "./-x", "--output=json", "--", "-n").stdout)
        expect(d["name"] == "-n", "dump IMAGE --output=json -- -n")
        d = json.loads(qbm("info", "--output=json", "--", "-x").stdout)
        expect(d["filename"] == "-x", "info --output=json -- -x")
        before = read("-x")
        p = qbm("rename", "-x", "--dry-run", "--", "-n", "-q", ok=None)
        expect(p.returncode == 2, "rename -x ... took -x as an option? %d" %
               p.returncode)
        p = qbm("rename", "--dry-run", "--", "-x", "-n", "-q")
        expect(read("-x") == before and "would rename bitmap '-n'" in
               p.stdout and "to '-q'" in p.stdout,
               "rename --dry-run -- -x -n -q: %s" % p.stdout)
        # After --, an option is an operand: one too many here.
        p = qbm("info", "--", "-x", "--output=json", ok=(2,))
        expect(p.stdout == "", "info -- IMAGE --output=json printed")
    finally:
        os.chdir(cwd)


# ---------------------------------------------------------------------------
# -f

def case_format(qbm, tmp):
    """-f raw (and --format=vmdk) are refused before anything is opened;
    restore -f qcow2 refuses a raw FULL, which it takes without -f."""
    img = image(tmp, "a.qcow2", ["b0"])
    before = read(img)
    argv = {
        "info": [img], "dump": [img, "b0"], "add": [img, "x"],
        "remove": [img, "b0"], "clear": [img, "b0"], "enable": [img, "b0"],
        "disable": [img, "b0"], "rename": [img, "b0", "c0"],
        "merge": [img, "b0", "b0"], "copy": [img, img],
        "populate": [img, "b0"], "commit-bitmaps": [img, img],
        "snapshot-bitmaps": [img, img], "check": ["-r", "all", img],
        "restore": ["-o", os.path.join(tmp, "o"), img],
        "extract": ["-o", os.path.join(tmp, "o"), img, "b0"],
        "consolidate": [img, img],
        "rebuild": [img, "b0", img], "verify": [img, img],
    }
    for cmd in TAKES_IMAGE:
        for opt, fmt in ((["-f", "raw"], "raw"),
                         (["--format=vmdk"], "vmdk")):
            p = qbm(cmd, *(argv[cmd] + opt), ok=(2,))
            want = ["qbm: %s: -f %s: only qcow2 images are supported" %
                    (cmd, fmt), "Try 'qbm help %s'." % cmd]
            expect(p.stderr.splitlines() == want and p.stdout == "",
                   "%s %s: %r" % (cmd, " ".join(opt), p.stderr))
            expect(read(img) == before, "%s -f %s changed the image" %
                   (cmd, fmt))
    expect(not os.path.exists(os.path.join(tmp, "o")), "an output appeared")
    raw = os.path.join(tmp, "full.raw")
    qemu_img("create", "-q", "-f", "raw", raw, str(SIZE))
    out = os.path.join(tmp, "out.raw")
    p = qbm("restore", "-f", "qcow2", "-o", out, raw, ok=(1,))
    expect("not a qcow2 image" in p.stderr and not os.path.exists(out),
           "restore -f qcow2 RAW: %r" % p.stderr)
    qbm("restore", "-o", out, raw)
    expect(qemu_img_compare(out, raw), "restore RAW without -f")
    # verify compares a raw IMAGE, unless -f qcow2 says it is qcow2.
    p = qbm("verify", "-f", "qcow2", raw, out, ok=(1,))
    expect(p.stderr.startswith("qbm: %s: not a qcow2 image" % raw) and
           p.stdout == "", "verify -f qcow2 RAW: %r" % p.stderr)
    qbm("verify", raw, out)


# ---------------------------------------------------------------------------
# -q

def case_quiet(qbm, tmp):
    """-q: nothing on stdout, no progress; exit status, errors and
    warnings as without it."""
    img = image(tmp, "a.qcow2", ["b0"], ["write 1M 64k"])
    for args in (["info", img], ["dump", img, "b0"], ["check", img],
                 ["info", "--output=json", img]):
        p = qbm(*(args + ["-q"]))
        expect(p.stdout == "" and p.stderr == "", "%s -q printed %r %r" %
               (" ".join(args[:1]), p.stdout, p.stderr))
    before = read(img)
    p = qbm("add", "--quiet", "-n", img, "b1")
    expect(p.stdout == "" and read(img) == before, "add -q -n: %r" %
           p.stdout)
    p = qbm("dump", "-q", img, "nosuch", ok=(1,))
    expect(p.stderr.startswith("qbm: %s: " % img) and p.stdout == "",
           "dump -q of a missing bitmap: %r" % p.stderr)
    # A warning stays: commit-bitmaps leaves a bitmap with a gap.
    base = image(tmp, "base.qcow2", ["ck"])
    mid = image(tmp, "mid.qcow2", backing=base)
    top = image(tmp, "top.qcow2", ["ck"], backing=mid)
    p = qbm("commit-bitmaps", "-q", top, base)
    expect(p.stdout == "" and "warning: bitmap 'ck' not carried" in p.stderr,
           "commit-bitmaps -q: %r %r" % (p.stdout, p.stderr))
    full = image(tmp, "full.qcow2", writes=["write 0 1M"])
    out = os.path.join(tmp, "out.raw")
    p = qbm("restore", "-p", "-q", "-o", out, full)
    expect(p.stdout == "" and p.stderr == "", "restore -p -q: %r" %
           p.stderr)
    p = qbm("restore", "-p", "-o", out, full)
    expect("100.00/100%" in p.stderr, "restore -p shows no progress")
    # verify -q: the exit status says what stdout would have.
    qemu_io(full, "write 4M 4k")
    p = qbm("verify", "-q", "-p", full, out, ok=(2,))
    expect(p.stdout == "" and p.stderr == "", "verify -q -p: %r %r" %
           (p.stdout, p.stderr))


# ---------------------------------------------------------------------------
# Misuse

def case_misuse(qbm, tmp, quick):
    """Every command (quick: three): one line 'qbm: CMD: ...' and the hint,
    exit 2, nothing on stdout."""
    img = image(tmp, "a.qcow2", ["b0"])
    for cmd in ["info", "add", "checkpoints"] if quick else COMMANDS:
        for args, msg in (
                (["--no-such", img], "unrecognized option '--no-such'"),
                ([img, "-Z"], "invalid option -- 'Z'"),
                (["--help=x"], "option '--help' doesn't allow an argument"),
                ([], "expected ")):
            p = qbm(cmd, *args, ok=(2,))
            lines = p.stderr.splitlines()
            expect(len(lines) == 2 and lines[0].startswith(
                "qbm: %s: %s" % (cmd, msg)) and
                lines[1] == "Try 'qbm help %s'." % cmd and p.stdout == "",
                "qbm %s %s: %r" % (cmd, " ".join(args), p.stderr))
    for args, msg in ((["add", img, "x", "-g"],
                       "option requires an argument -- 'g'"),
                      (["info", img, "--output"],
                       "option '--output' requires an argument"),
                      (["info", img, "--output=xml"],
                       "--output must be human or json"),
                      (["info", img, "--f"], "ambiguous option '--f'"),
                      (["check", img, "-r", "some"],
                       "-r must be leaks or all")):
        p = qbm(*args, ok=(2,))
        want = ["qbm: %s: %s" % (args[0], msg), "Try 'qbm help %s'." %
                args[0]]
        expect(p.stderr.splitlines() == want, "qbm %s: %r" %
               (" ".join(args), p.stderr))
    p = qbm("nosuch", ok=(2,))
    expect(p.stderr.splitlines() == ["qbm: unknown command 'nosuch'",
                                     "Try 'qbm --help'."],
           "qbm nosuch: %r" % p.stderr)


# ---------------------------------------------------------------------------
# help

def case_help(qbm, tmp, quick):
    """qbm help CMD == qbm CMD --help == qbm CMD OPERAND --help (quick:
    only the first): CMD's usage, with the common options it takes."""
    img = image(tmp, "a.qcow2")
    general = qbm("help").stdout
    for cmd in COMMANDS:
        expect(cmd in general, "qbm help does not list %s" % cmd)
        h = qbm("help", cmd)
        expect(h.stdout.startswith("Usage: qbm %s " % cmd),
               "qbm help %s: %r" % (cmd, h.stdout[:80]))
        for opt in ("-q, --quiet", "-h, --help"):
            expect(opt in h.stdout, "qbm help %s lacks %s" % (cmd, opt))
        if cmd in TAKES_IMAGE:
            expect("-f, --format=qcow2" in h.stdout,
                   "qbm help %s lacks -f" % cmd)
        if quick:
            continue
        expect(qbm(cmd, "--help").stdout == h.stdout,
               "qbm %s --help differs from qbm help %s" % (cmd, cmd))
        expect(qbm(cmd, img, "--help").stdout == h.stdout,
               "qbm %s IMAGE --help differs" % cmd)
    p = qbm("help", "nosuch", ok=(2,))
    expect("unknown command 'nosuch'" in p.stderr, "qbm help nosuch")


# ---------------------------------------------------------------------------
# check -r

def leaky(tmp, name):
    """An image with an in-use bitmap (QEMU killed while it was open) and
    a leaked cluster (the file grown by two clusters, the first with
    refcount 1 and no reference, as a crash between a refcount update and
    its use leaves)."""
    img = image(tmp, name, ["b0"], ["write 1M 64k"])
    run(["qemu-io", "-f", "qcow2", "-c", "write 2M 64k", "-c", "abort", img],
        ok=None)
    expect("in-use" in qemu_bitmaps(img)["b0"][1], "b0 is not in use")
    q = Qcow2(img)
    expect(q.refcount_order == 4, "refcounts are not 16-bit")
    block = q.refcount_table()[0] & OFFSET_MASK
    cluster = -(-os.path.getsize(img) // q.cluster_size)
    with open(img, "r+b") as f:
        f.truncate((cluster + 2) * q.cluster_size)
        f.seek(block + 2 * cluster)
        f.write(struct.pack(">H", 1))
    p = qemu_img_check(img, ok=(3,))
    expect("Leaked cluster %d " % cluster in p.stdout + p.stderr,
           "the leak is not QEMU's: %s" % (p.stdout + p.stderr))
    return img


def case_check_repair(qbm, tmp):
    """-r all == --repair (the same file); -r leaks frees only the leak;
    QEMU finds both clean."""
    orig = leaky(tmp, "orig.qcow2")
    copies = {}
    for mode in ("--repair", "-r all", "--repair=all", "-r leaks",
                 "--repair=leaks"):
        copies[mode] = os.path.join(tmp, "c%d.qcow2" % len(copies))
        shutil.copyfile(orig, copies[mode])
    qbm("check", copies["--repair"], "--repair")
    qbm("check", copies["-r all"], "-r", "all")
    qbm("check", "--repair=all", copies["--repair=all"])
    for mode in ("--repair", "-r all", "--repair=all"):
        qemu_img_check(copies[mode])
        expect(qemu_bitmaps(copies[mode])["b0"][1] == ["auto"],
               "%s left b0 in use" % mode)
        expect(read(copies[mode]) == read(copies["--repair"]),
               "%s and --repair made different files" % mode)
    # The in-use bitmap stays: check reports it (exit 2) after the repair.
    p = qbm("check", copies["-r leaks"], "-r", "leaks", ok=(2,))
    expect("Leaked" not in p.stdout, "-r leaks left leaks:\n" + p.stdout)
    qbm("check", "--repair=leaks", copies["--repair=leaks"], ok=(2,))
    for mode in ("-r leaks", "--repair=leaks"):
        qemu_img_check(copies[mode])
        expect("in-use" in qemu_bitmaps(copies[mode])["b0"][1],
               "%s repaired the in-use bitmap" % mode)
    expect(read(copies["-r leaks"]) == read(copies["--repair=leaks"]),
           "-r leaks and --repair=leaks made different files")
    p = qbm("check", "-U", "-r", "leaks", orig, ok=(2,))
    expect("cannot be used with -U" in p.stderr, "check -U -r leaks")


def main():
    suite = Suite("cli", __doc__)
    suite.parser.add_argument(
        "--quick", action="store_true", help="leave out the -f qcow2 and "
        "--format=qcow2 reruns of every command, and repetitions of the "
        "misuse and help checks (for valgrind)")
    args = suite.start()
    # case_double_dash runs in its temporary directory.
    suite.qbm.path = os.path.abspath(suite.qbm.path)
    for cmd, fn in AFTER:
        suite.case("options after operands: " + cmd,
                   lambda tmp, fn=fn: fn(suite.qbm, tmp, []))
    for cmd, fn in AFTER:
        if cmd in TAKES_IMAGE and not args.quick:
            suite.case("-f qcow2: " + cmd,
                       lambda tmp, fn=fn: fn(suite.qbm, tmp, ["-f", "qcow2"]))
            suite.case("--format=qcow2: " + cmd, lambda tmp, fn=fn: fn(
                suite.qbm, tmp, ["--format=qcow2"]))
    for fn in (case_double_dash, case_format, case_quiet, case_check_repair):
        suite.case(fn.__name__, lambda tmp, fn=fn: fn(suite.qbm, tmp))
    for fn in (case_misuse, case_help):
        suite.case(fn.__name__,
                   lambda tmp, fn=fn: fn(suite.qbm, tmp, args.quick))
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
