#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Make the installed libqbm.a from the library's archive of objects: link
them into one relocatable object (CC -r), keep global only the names the
version script lists (objcopy --keep-global-symbols), and archive that. A
program linking libqbm.a then reaches the public API and nothing else, as
with the shared library.

    static-lib.py --syms libqbm.syms --objcopy OBJCOPY --ar AR \\
        --output libqbm.a libqbm-core.a -- CC [ARGS...]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile


def public_names(syms):
    """The names in the global: part of a version script."""
    names, glob = [], False
    with open(syms) as f:
        for line in f:
            line = line.strip()
            if line.startswith("global:"):
                glob = True
            elif line.startswith("local:"):
                glob = False
            elif glob and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*;", line):
                names.append(line[:-1])
    return names


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--syms", required=True)
    ap.add_argument("--objcopy", required=True)
    ap.add_argument("--ar", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("archive")
    ap.add_argument("cc", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cc = a.cc[1:] if a.cc and a.cc[0] == "--" else a.cc
    names = public_names(a.syms)
    if not names:
        sys.exit("%s: no global names" % a.syms)
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "libqbm.o")
        keep = os.path.join(tmp, "keep")
        with open(keep, "w") as f:
            f.write("\n".join(names) + "\n")
        subprocess.run(cc + ["-r", "-nostdlib", "-Wl,--whole-archive",
                             a.archive, "-Wl,--no-whole-archive", "-o", obj],
                       check=True)
        subprocess.run([a.objcopy, "--keep-global-symbols=" + keep,
                        obj], check=True)
        if os.path.exists(a.output):
            os.unlink(a.output)
        subprocess.run([a.ar, "rcs", a.output, obj], check=True)


if __name__ == "__main__":
    main()
