#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Fails when a C file of lib/, tools/ or python/ is not formatted as
# .clang-format says (clang-format 14, Debian 12's). `clang-format -i` on
# the files named fixes them.
set -euo pipefail
cd "$(dirname "$0")/.."
clang-format --dry-run --Werror lib/*.c lib/*.h lib/include/*.h \
    tools/*.c tools/*.h python/*.c
