#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Check that libqbm's files call each other only down the layer order.

Reads the layer table of docs/design.md (section "Layers": one row per
layer, bottom first, every file of the layer in the second column between
backquotes, old and new name of a pending rename both listed, or a pattern
such as `txn-*.c`) and the
symbols of lib's object files (`nm` of the static library, or of .o
files). Builds the file-level call graph (file A uses file B when A leaves
a symbol undefined that B defines) and fails on

  - a call into a layer above the caller's,
  - a cycle of files (which could only be inside one layer, as the first
    rule forbids the others),
  - an object file that is in no layer of the table.

Usage: layer-check.py --table docs/design.md [--nm nm] LIB.a|FILE.o...
Exit status 0 when clean, 1 with one line per violation on stderr.
"""

import argparse
import fnmatch
import os
import re
import subprocess
import sys


def parse_table(path):
    """Return ([layer names, bottom first], {file name: layer index})."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    m = re.search(r'^## Layers\n(.*?)(?=^## )', text, re.M | re.S)
    if not m:
        sys.exit(f'{path}: no "## Layers" section')
    rows = [line for line in m.group(1).splitlines()
            if line.startswith('|')]
    if len(rows) < 3:
        sys.exit(f'{path}: no layer table in "## Layers"')
    layers, where = [], {}
    for row in rows[2:]:  # past the header and the |---| line
        cells = [c.strip() for c in row.strip().strip('|').split('|')]
        if len(cells) < 2:
            sys.exit(f'{path}: layer table row without files: {row}')
        name = cells[0].strip('`* ')
        files = re.findall(r'`([A-Za-z0-9_.*-]+\.[ch])`', cells[1])
        if not files:
            sys.exit(f'{path}: layer {name!r} lists no files')
        for fn in files:
            if fn in where:
                sys.exit(f'{path}: {fn} is in two layers')
            where[fn] = len(layers)
        layers.append(name)
    return layers, where


def layer_of(where, src):
    """The layer index of file `src`, or None."""
    if src in where:
        return where[src]
    for pattern, layer in where.items():
        if '*' in pattern and fnmatch.fnmatchcase(src, pattern):
            return layer
    return None


def read_symbols(nm, paths):
    """Return {source file: (defined symbols, undefined symbols)}."""
    out = {}
    for path in paths:
        res = subprocess.run([nm, path], capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f'{nm} {path}: {res.stderr.strip()}')
        member = None
        if path.endswith('.o'):
            member = os.path.basename(path)
        for line in res.stdout.splitlines():
            if line.endswith('.o:'):
                member = line[:-1]
                continue
            parts = line.split()
            if member is None or len(parts) < 2:
                continue
            src = re.sub(r'\.o$', '', os.path.basename(member))
            defs, undefs = out.setdefault(src, (set(), set()))
            kind, sym = parts[-2], parts[-1]
            if kind == 'U':
                undefs.add(sym)
            elif kind.isupper():
                defs.add(sym)
    return out


def call_graph(symbols):
    """Return {caller: {callee: sorted symbols}} between distinct files."""
    owner = {}
    for src, (defs, _) in symbols.items():
        for sym in defs:
            owner[sym] = src
    graph = {src: {} for src in symbols}
    for src, (_, undefs) in symbols.items():
        for sym in sorted(undefs):
            dst = owner.get(sym)
            if dst and dst != src:
                graph[src].setdefault(dst, []).append(sym)
    return graph


def cycles(graph):
    """Strongly connected components of more than one file (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--table', required=True,
                    help='the markdown file with the layer table')
    ap.add_argument('--nm', default='nm')
    ap.add_argument('objects', nargs='+',
                    help="lib's static library or object files")
    args = ap.parse_args()

    layers, where = parse_table(args.table)
    symbols = read_symbols(args.nm, args.objects)
    if not symbols:
        sys.exit('no object files found')
    graph = call_graph(symbols)
    rank = {src: layer_of(where, src) for src in graph}
    errors = []
    for src in sorted(graph):
        if rank[src] is None:
            errors.append(f'lib/{src}: in no layer of the table in '
                          f'{args.table}')
    for src in sorted(graph):
        for dst, syms in sorted(graph[src].items()):
            if rank[src] is None or rank[dst] is None:
                continue
            if rank[dst] > rank[src]:
                errors.append(
                    f'lib/{src} ({layers[rank[src]]}) uses lib/{dst} '
                    f'({layers[rank[dst]]}, a layer above): '
                    + ' '.join(syms))
    for comp in cycles(graph):
        edges = [f'{a} -> {b} ({" ".join(graph[a][b])})'
                 for a in comp for b in sorted(graph[a]) if b in comp]
        errors.append('dependency cycle among ' + ', '.join(comp) + ': '
                      + '; '.join(edges))
    for e in errors:
        print('layer-check: ' + e, file=sys.stderr)
    if errors:
        return 1
    print(f'layer-check: {len(graph)} files in {len(layers)} layers, '
          f'{sum(len(d) for d in graph.values())} file dependencies, '
          'none upward, no cycle')
    return 0


if __name__ == '__main__':
    sys.exit(main())
