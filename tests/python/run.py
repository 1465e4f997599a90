# SPDX-License-Identifier: LGPL-2.1-or-later
"""Runs the Python module's pytest suite (tests/python) as the test
`python`: `python3 -m pytest` with the built module on PYTHONPATH, the
interpreter being the one the module was built for.

Skip rules as tests/qbmtest.py's: exit 77 when the module could not be
built (no interpreter with its headers), pytest is missing or a QEMU tool
is, but under CI (CI set and not "false" or "0") each of those is a
failure.

    run.py --module-dir DIR [PYTEST ARGS...]
    run.py --missing REASON
"""
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
import qbmtest  # noqa: E402


def skip(reason):
    print(reason)
    if qbmtest.in_ci():
        print("(a failure under CI)")
        sys.exit(1)
    sys.exit(qbmtest.SKIP)


def main():
    args = sys.argv[1:]
    if args[:1] == ["--missing"]:
        skip(" ".join(args[1:]))
    if args[:1] != ["--module-dir"] or len(args) < 2:
        print(__doc__)
        sys.exit(2)
    module_dir = args[1]
    try:
        import pytest  # noqa: F401
    except ImportError:
        skip("pytest is missing for %s (Debian: python3-pytest)" %
             sys.executable)
    qbmtest.require(qbmtest.QEMU_TOOLS)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [module_dir] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                        if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    seed = env.get("QBM_TEST_SEED") or str(random.randrange(1 << 31))
    env["QBM_TEST_SEED"] = seed
    print("seed %s (QBM_TEST_SEED=%s replays it)" % (seed, seed), flush=True)
    here = os.path.dirname(os.path.abspath(__file__))
    with qbmtest.tempdir("python") as tmp:
        p = subprocess.run([sys.executable, "-m", "pytest", "-p",
                            "no:cacheprovider", "-q", "-rs",
                            "--basetemp", os.path.join(tmp, "t"), here] +
                           args[2:], env=env)
    sys.exit(p.returncode)


main()
