#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Builds the seed corpus (fuzz/corpus/open) from small qemu-img images:
# several cluster sizes, refcount widths, extended L2, zstd, compressed and
# zero writes, bitmaps enabled/disabled/in use, snapshots, backing names,
# version 2. The edit harness reads its first 16 bytes as a program, so
# each image is also stored behind a program prefix.
set -euo pipefail
out=$(cd "$(dirname "$0")" && pwd)/corpus/open
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
n=0
emit() { # file
    cp "$1" "$out/seed-$n.qcow2"
    { printf '\x00\x05\x06\x01\x07\x03\x02\x09\x04\x00\x08\x11\x05\x02\x01\x00'
      cat "$1"; } > "$out/prog-$n.bin"
    n=$((n + 1))
}
for cs in 512 4096; do
  for opts in "" ",refcount_bits=1" ",refcount_bits=64" ",compression_type=zstd" \
              ",lazy_refcounts=on"; do
    qemu-img create -q -f qcow2 -o cluster_size=$cs$opts a.qcow2 2M
    qemu-img bitmap --add -g 512 a.qcow2 b0
    qemu-img bitmap --add --disable -g 4096 a.qcow2 b1
    qemu-io -f qcow2 -c 'write 0 3k' -c 'write -z 64k 8k' \
        -c "write -c 1M $cs" a.qcow2 >/dev/null
    emit a.qcow2
  done
done
qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on a.qcow2 1M
qemu-img bitmap --add a.qcow2 x
qemu-io -f qcow2 -c 'write 512 1k' -c 'write -z 32k 2k' a.qcow2 >/dev/null
emit a.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512 a.qcow2 1M
qemu-img bitmap --add -g 512 a.qcow2 crashed
qemu-io -f qcow2 -c 'write 0 4k' -c abort a.qcow2 >/dev/null 2>&1 || true
emit a.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512 a.qcow2 1M
qemu-io -f qcow2 -c 'write 0 8k' a.qcow2 >/dev/null
qemu-img snapshot -c s1 a.qcow2
qemu-io -f qcow2 -c 'write 0 4k' a.qcow2 >/dev/null
qemu-img bitmap --add -g 1k a.qcow2 after-snap
emit a.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512 base.qcow2 1M
qemu-img create -q -f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 a.qcow2
qemu-img bitmap --add -g 512 a.qcow2 top
emit a.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512,compat=0.10 a.qcow2 1M
qemu-io -f qcow2 -c 'write 0 4k' a.qcow2 >/dev/null
emit a.qcow2
echo "wrote $((n * 2)) files to $out"
