#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""What `meson install --destdir` puts in place (issue 14 items 4 and 5):

- bin/qbm: a PIE linked with the shared libqbm (NEEDED libqbm.so.0, no
  run path into the build tree; with -Dstatic_tool=true a static program),
  which runs from the installed library;
- libqbm.so.0 and libqbm.a: exactly the names of libqbm.syms global (no
  test hook such as qbm_alloc_fail_after, no internal function: a program
  that calls one does not link); a program linked with each runs;
- man1/qbm.1 and a man3 page per group of calls (qbm.3 among them);
- share/bash-completion/completions/qbm: loaded by bash, `complete -p qbm`
  names its function, which completes commands, options and the bitmaps of
  the image on the line;
- the Python module (when built): imported from the installed tree, it
  reads an image's bitmaps;
- libqbm.pc and qbm.h.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
from qbmtest import Fail, MiB, Suite, qemu_img, qemu_img_create, run  # noqa

PAGES = ["qbm.3", "qbm_get_error.3", "qbm_open.3", "qbm_bitmap_count.3",
         "qbm_bitmap_add.3", "qbm_check.3", "qbm_restore.3", "qbm_rebuild.3",
         "qbm_chain_open.3", "qbm_checkpoints_new.3"]


def expect(cond, what):
    if not cond:
        raise Fail(what)


def find(root, pattern):
    hits = sorted(glob.glob(os.path.join(root, "**", pattern),
                            recursive=True))
    expect(hits, "nothing installed matches %s" % pattern)
    return hits[0]


def public_names(syms):
    return sorted(set(re.findall(r"^\s*(qbm_\w+);", open(syms).read(),
                                 re.M)))


def defined_globals(cmd):
    out = run(cmd).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-2] in "TDBRVWi":
            names.add(parts[-1].split("@")[0])
    return sorted(names)


class Tree:
    """The installed tree under DESTDIR."""

    def __init__(self, args, dest):
        run(["meson", "install", "-C", args.build_dir, "--no-rebuild",
             "--quiet", "--destdir", dest])
        self.dest = dest
        self.qbm = find(dest, "bin/qbm")
        self.so = find(dest, "libqbm.so.0")
        self.a = find(dest, "libqbm.a")
        self.libdir = os.path.dirname(self.so)
        self.header = find(dest, "include/qbm.h")
        self.env = dict(os.environ, LD_LIBRARY_PATH=self.libdir)


def case_qbm(suite, t, tmp):
    args = suite.args
    hdr = run(["readelf", "-h", t.qbm]).stdout
    dyn = run(["readelf", "-d", t.qbm]).stdout
    if args.static_tool == "yes":
        expect("NEEDED" not in dyn, "a static qbm needs libraries:\n" + dyn)
    else:
        expect("Type:                              DYN" in hdr,
               "qbm is not position independent:\n" + hdr)
        expect("Shared library: [libqbm.so.0]" in dyn,
               "qbm does not need libqbm.so.0:\n" + dyn)
        expect(args.build_dir not in dyn,
               "the installed qbm still looks in the build tree:\n" + dyn)
        if shutil.which("file"):
            out = run(["file", "-L", t.qbm]).stdout
            expect("pie executable" in out, "file says: " + out)
        # The installed library, not the build tree's (LD_DEBUG shows
        # which one the loader takes).
        p = run([t.qbm, "--version"], env=dict(t.env, LD_DEBUG="libs"))
        expect("calling init: %s" % t.so in p.stderr.replace(
            os.path.realpath(t.so), t.so) or
            os.path.realpath(t.so) in p.stderr,
            "qbm did not load the installed libqbm:\n" + p.stderr[-2000:])
    p = run([t.qbm, "--version"], env=t.env)
    expect(p.stdout == "qbm %s\n" % args.version, "version: " + p.stdout)
    img = qemu_img_create(os.path.join(tmp, "a.qcow2"), 16 * MiB)
    qemu_img("bitmap", "--add", img, "ck1")
    p = run([t.qbm, "info", img], env=t.env)
    expect("    ck1:" in p.stdout, p.stdout)


def case_exports(suite, t, tmp):
    want = public_names(suite.args.syms)
    got = defined_globals(["nm", "-D", "--defined-only", t.so])
    expect(got == want, "libqbm.so exports %s more, %s missing" % (
        sorted(set(got) - set(want)), sorted(set(want) - set(got))))
    got = defined_globals(["nm", "-g", "--defined-only", t.a])
    expect(got == want, "libqbm.a exports %s more, %s missing" % (
        sorted(set(got) - set(want)), sorted(set(want) - set(got))))
    for lib in (t.so, t.a):
        out = run(["nm", "-a", lib], ok=None).stdout + run(
            ["nm", "-D", lib], ok=None).stdout
        expect("qbm_alloc_fail_after" not in out,
               "%s has the allocation test hook" % lib)
    # The compiler and sanitizers the library was built with: a sanitizer
    # build's libqbm.a needs its runtime at link time.
    cc = suite.args.cc or os.environ.get("CC", "cc")
    san = ([] if suite.args.sanitize in ("", "none") else
           ["-fsanitize=" + suite.args.sanitize])
    inc = os.path.dirname(t.header)
    good = os.path.join(tmp, "good.c")
    with open(good, "w") as f:
        f.write('#include <stdio.h>\n#include "qbm.h"\n'
                "int main(void) { printf(\"%d %s\\n\", "
                "QBM_CHECK_VERSION(0, 1, 0), qbm_version()); "
                "return 0; }\n")
    bad = os.path.join(tmp, "bad.c")
    with open(bad, "w") as f:
        f.write("void *qbm_malloc(unsigned long n);\n"
                "int main(void) { return qbm_malloc(1) == 0; }\n")
    for lib, extra in ((t.a, ["-lz", "-lzstd"] + san), (t.so, san)):
        exe = os.path.join(tmp, "good")
        run([cc, "-I", inc, good, lib] + extra + ["-o", exe])
        p = run([exe], env=t.env)
        expect(p.stdout == "1 %s\n" % suite.args.version, p.stdout)
        p = run([cc, bad, lib] + extra + ["-o", exe + "-bad"], ok=None)
        expect(p.returncode != 0 and "qbm_malloc" in p.stderr,
               "an internal function links from %s" % lib)
    find(t.dest, "pkgconfig/libqbm.pc")


def case_man(suite, t, tmp):
    find(t.dest, "man1/qbm.1")
    for page in PAGES:
        path = find(t.dest, "man3/" + page)
        if shutil.which("man"):
            p = run(["man", "-l", path], env=dict(os.environ, MANWIDTH="80"))
            expect("qbm" in p.stdout, "man -l %s: %s" % (path, p.stdout))


def case_completion(suite, t, tmp):
    comp = find(t.dest, "share/bash-completion/completions/qbm")
    img = qemu_img_create(os.path.join(tmp, "disk.qcow2"), 16 * MiB)
    for b in ("ck1", "ck2", "daily"):
        qemu_img("bitmap", "--add", img, b)
    script = r"""
source "$1"
complete -p qbm
c() {
    COMPREPLY=()
    COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
    COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
    _qbm
    echo "${COMPREPLY[*]}"
}
c qbm in
c qbm dump disk.qcow2 ck
c qbm remove disk.qcow2 ""
c qbm info --out
c qbm check -r ""
c qbm extract -o out.qcow2 disk.qcow2 d
c qbm reb
c qbm ver
c qbm rebuild -g 64k disk.qcow2 ck
c qbm rebuild disk.qcow2 ck1 ""
c qbm verify --bi
c qbm verify disk.qcow2 full.raw --bitmap d
c qbm verify -p -B ck disk.qcow2 full.raw --output=json d
"""
    env = dict(t.env, PATH=os.path.dirname(t.qbm) + ":" +
               os.environ["PATH"])
    p = run(["bash", "--norc", "-c", script, "bash", comp], cwd=tmp,
            env=env)
    lines = p.stdout.splitlines()
    want = ["complete -o filenames -F _qbm qbm", "info", "ck1 ck2",
            "ck1 ck2 daily", "--output=", "leaks all", "daily", "rebuild",
            "verify", "ck1 ck2", "disk.qcow2", "--bitmap=", "daily",
            "disk.qcow2"]
    expect(lines == want, "completion: %r, expected %r" % (lines, want))


def case_python(suite, t, tmp):
    if not suite.args.python:
        print("the Python module was not built: not checked")
        return
    mod = find(t.dest, "qbm*.so")
    expect(os.path.exists(os.path.join(os.path.dirname(mod), "qbm.pyi")),
           "qbm.pyi is not beside the module")
    img = qemu_img_create(os.path.join(tmp, "a.qcow2"), 16 * MiB)
    qemu_img("bitmap", "--add", img, "ck1")
    code = ("import qbm, sys\n"
            "assert qbm.__file__.startswith(sys.argv[1]), qbm.__file__\n"
            "with qbm.open(sys.argv[2]) as img:\n"
            "    print([b.name for b in img.bitmaps])\n")
    p = run([suite.args.python, "-c", code, t.dest, img],
            env=dict(t.env, PYTHONPATH=os.path.dirname(mod)))
    expect(p.stdout == "['ck1']\n", p.stdout)


def main():
    suite = Suite("install", __doc__, tools=["qemu-img"])
    suite.parser.add_argument("--build-dir", required=True)
    suite.parser.add_argument("--syms", required=True)
    suite.parser.add_argument("--version", required=True)
    suite.parser.add_argument("--static-tool", default="no")
    suite.parser.add_argument("--cc", default=None)
    suite.parser.add_argument("--sanitize", default="none")
    suite.parser.add_argument("--python")
    suite.start()
    with suite.tempdir() as dest:
        try:
            t = Tree(suite.args, dest)
        except Fail as e:
            suite.fail("meson install: %s" % e)
            return suite.finish()
        for fn in (case_qbm, case_exports, case_man, case_completion,
                   case_python):
            suite.case(fn.__name__, lambda tmp, fn=fn: fn(suite, t, tmp))
    return suite.finish()


if __name__ == "__main__":
    sys.exit(main())
