#!/usr/bin/env python3
"""Fails when modules of one crate import each other in a circle.

Crate boundaries (pen-core < pen-vm < pen-build < pen) make cargo refuse a cycle between
layers; inside a crate nothing does, so CI runs this over each crate's `src/`. It reads the
paths a file names (`crate::a::b`, `super::x`, `self::x`, braces too; comments ignored),
resolves each to the module it lands in, and checks every level of the module tree: the
top-level modules of the crate, and the submodules of each module (`supervisor/sessions.rs`
naming `super::serve` while `serve.rs` names `super::sessions` is a circle). A child naming
its parent, or a parent its child, is how Rust modules nest and is not counted.

usage: scripts/check-module-cycles.py crates/*/src
"""
import collections
import os
import re
import sys

IDENT = r'[A-Za-z_][A-Za-z0-9_]*'
PATH = re.compile(r'\b(crate|self|super)((?:::super)*)::(\{|' + IDENT + r'(?:::' + IDENT + r')*)')


def module_of(rel):
    """Module path of a source file: ['supervisor', 'sessions'] for supervisor/sessions.rs."""
    parts = rel[:-3].split('/')
    if parts[-1] in ('mod', 'lib', 'main'):
        parts = parts[:-1]
    return tuple(parts)


def braced(s, start):
    """The text inside the brace group opening at s[start], and its end."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] == '{':
            depth += 1
        elif s[i] == '}':
            depth -= 1
            if depth == 0:
                return s[start + 1:i], i
    return s[start + 1:], len(s)


def items(group):
    """Top-level comma-separated items of a brace group, each as its leading path segments."""
    out, depth, cur = [], 0, ''
    for ch in group:
        if ch == '{':
            depth += 1
        elif ch == '}':
            depth -= 1
        if ch == ',' and depth == 0:
            out.append(cur)
            cur = ''
        else:
            cur += ch
    out.append(cur)
    paths = []
    for item in out:
        segs = re.findall(IDENT, item.split('{')[0])
        if segs and segs[0] != 'self':
            paths.append(segs)
    return paths


def references(src_module, text):
    """Every module path `text` names, as absolute segment lists."""
    for m in PATH.finditer(text):
        kind, supers, rest = m.group(1), m.group(2), m.group(3)
        if kind == 'crate':
            base = ()
        elif kind == 'self':
            base = src_module
        else:
            ups = 1 + supers.count('super')
            base = src_module[:max(0, len(src_module) - ups)]
        if rest == '{':
            group, _ = braced(text, m.end() - 1)
            for segs in items(group):
                yield base + tuple(segs)
        else:
            yield base + tuple(rest.split('::'))


def graph(src):
    files = {}
    for root, _, names in os.walk(src):
        for f in names:
            if f.endswith('.rs'):
                rel = os.path.relpath(os.path.join(root, f), src)
                files[rel] = module_of(rel)
    modules = set(files.values())
    levels = collections.defaultdict(lambda: collections.defaultdict(set))
    for rel, mod in files.items():
        if not mod:
            continue  # lib.rs / main.rs: the root names everything
        text = re.sub(r'//[^\n]*', '', open(os.path.join(src, rel)).read())
        for path in references(mod, text):
            # The longest prefix of the path that is a module.
            target = None
            for n in range(len(path), 0, -1):
                if path[:n] in modules:
                    target = path[:n]
                    break
            if target is None:
                continue
            common = 0
            while common < min(len(mod), len(target)) and mod[common] == target[common]:
                common += 1
            if common == len(mod) or common == len(target):
                continue  # parent and child
            level = '::'.join(mod[:common]) or '(crate)'
            levels[level][mod[common]].add(target[common])
    return levels


def cycles(g):
    color = {}
    stack = []
    found = []

    def dfs(u):
        color[u] = 1
        stack.append(u)
        for v in sorted(g[u]):
            if color.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif not color.get(v):
                dfs(v)
        stack.pop()
        color[u] = 2

    for u in sorted(list(g)):
        if not color.get(u):
            dfs(u)
    return found


bad = False
for src in sys.argv[1:]:
    for level, g in sorted(graph(src).items()):
        for cycle in cycles(g):
            where = '' if level == '(crate)' else f' (in {level})'
            print(f"{src}: import cycle{where}: {' -> '.join(cycle)}")
            bad = True
if not bad:
    print('no import cycles among modules in', ' '.join(sys.argv[1:]))
sys.exit(1 if bad else 0)
