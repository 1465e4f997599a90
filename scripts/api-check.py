#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The public API's bookkeeping, checked (suite `lint`):
- QBM_VERSION_MAJOR/MINOR/MICRO in qbm.h equal meson's project version;
- every QBM_API function of qbm.h is in libqbm.syms, and every name there
  is a QBM_API function;
- every exported name has a section 3 page (a .Nm line of docs/man3/*.3).

    api-check.py --version X.Y.Z --header qbm.h --syms libqbm.syms \\
        --man3 docs/man3
"""
import argparse
import glob
import os
import re
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", required=True)
    ap.add_argument("--header", required=True)
    ap.add_argument("--syms", required=True)
    ap.add_argument("--man3", required=True)
    a = ap.parse_args()
    errors = []
    header = open(a.header).read()
    got = []
    for part in ("MAJOR", "MINOR", "MICRO"):
        m = re.search(r"#define QBM_VERSION_%s (\d+)" % part, header)
        got.append(m.group(1) if m else "?")
    if ".".join(got) != a.version:
        errors.append("%s: QBM_VERSION_* say %s, meson.build says %s"
                      % (a.header, ".".join(got), a.version))
    api = set(re.findall(r"QBM_API\s[^;{(]*?\**\s*(qbm_\w+)\s*\(", header))
    syms = set(re.findall(r"^\s*(qbm_\w+);", open(a.syms).read(), re.M))
    for n in sorted(api - syms):
        errors.append("%s: %s is not exported (add it to %s)"
                      % (a.header, n, a.syms))
    for n in sorted(syms - api):
        errors.append("%s: %s is not a QBM_API function of %s"
                      % (a.syms, n, a.header))
    pages = {}
    for page in glob.glob(os.path.join(a.man3, "*.3")):
        for line in open(page):
            m = re.match(r"\.Nm (\w+)", line)
            if m:
                pages[m.group(1)] = page
    for n in sorted(syms):
        if n not in pages:
            errors.append("%s has no man page (a .Nm line in %s/*.3)"
                          % (n, a.man3))
    for e in errors:
        print(e)
    print("api-check: %d exported names, %d pages, %d problems"
          % (len(syms), len(set(pages.values())), len(errors)))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
