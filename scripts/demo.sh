#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# A tour of qbm's main job on images it makes in a temporary directory:
# a disk with a checkpoint, an external snapshot taken without bitmap
# handling (the checkpoint silently stops covering new writes), the repair,
# an offline incremental backup, and a restore that QEMU confirms.
set -euo pipefail

QBM=${QBM:-$(cd "$(dirname "$0")/.." && pwd)/build/tools/qbm}
dir=$(mktemp -d /tmp/qbm-demo-XXXXXX)
trap 'rm -rf "$dir"' EXIT
cd "$dir"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "A 1 GiB VM disk with checkpoint ck1, then some guest writes"
run qemu-img create -q -f qcow2 base.qcow2 1G
run qemu-img bitmap --add base.qcow2 ck1
run qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -P 2 300M 64k' base.qcow2 >/dev/null
run qemu-img convert -O raw base.qcow2 full-at-ck1.raw   # the full backup

say "An external snapshot made without bitmap handling, more writes"
run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
run qemu-io -f qcow2 -c 'write -P 3 512M 128k' -c 'write -z 0 64k' top.qcow2 >/dev/null

say "qbm sees the chain: ck1 exists only in the base layer"
run "$QBM" info --chain top.qcow2
run "$QBM" check --chain top.qcow2 || true

say "Repair: continue ck1 in the new layer, marking what it already holds"
run "$QBM" snapshot-bitmaps base.qcow2 top.qcow2
run "$QBM" check --chain top.qcow2
run "$QBM" dump --chain top.qcow2 ck1

say "Offline incremental backup of the checkpoint, then start ck2"
run "$QBM" extract --chain --rotate ck2 -o inc1.qcow2 top.qcow2 ck1
run "$QBM" info --output=json inc1.qcow2 | head -c 300; echo

say "Restore full + incremental and let QEMU compare with the live disk"
run "$QBM" restore -o restored.raw full-at-ck1.raw inc1.qcow2
run qemu-img compare -f raw -F qcow2 restored.raw top.qcow2

say "Done: every step above was checked by QEMU's own tools"
