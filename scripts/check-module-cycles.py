#!/usr/bin/env python3
"""Fails when modules of one crate import each other in a circle.

Crate boundaries (pen-core < pen-vm < pen-build < pen) make cargo refuse a cycle between
layers; inside a crate nothing does, so CI runs this over each crate's `src/`. It reads
`crate::module` paths (comments ignored) and reports every circle it finds.

usage: scripts/check-module-cycles.py crates/*/src
"""
import re,os,sys,collections
def graph(src):
    mods=set()
    for e in os.listdir(src):
        if e in('lib.rs','main.rs'): continue
        mods.add(e.replace('.rs',''))
    g=collections.defaultdict(set)
    for root,_,files in os.walk(src):
        for f in files:
            p=os.path.relpath(os.path.join(root,f),src)
            top=p.split('/')[0].replace('.rs','')
            if top in('lib','main'): continue
            s=open(os.path.join(root,f)).read()
            s=re.sub(r'//[^\n]*','',s)  # ignore comments/doc links
            for m in re.finditer(r'crate::(\{[^}]*\}|[a-z_]+)',s):
                t=m.group(1)
                names=re.findall(r'\b[a-z_]+\b',t) if t.startswith('{') else [t]
                for n in names:
                    if n in mods and n!=top: g[top].add(n)
    return mods,g
def cycles(g):
    color={};stack=[];found=[]
    def dfs(u):
        color[u]=1;stack.append(u)
        for v in sorted(g[u]):
            if color.get(v)==1: found.append(stack[stack.index(v):]+[v])
            elif not color.get(v): dfs(v)
        stack.pop();color[u]=2
    for u in list(g): 
        if not color.get(u): dfs(u)
    return found
bad=False
for src in sys.argv[1:]:
    mods,g=graph(src)
    c=cycles(g)
    for cycle in c:
        print(f"{src}: import cycle: {' -> '.join(cycle)}")
        bad=True
if not bad:
    print('no import cycles among modules in', ' '.join(sys.argv[1:]))
sys.exit(1 if bad else 0)
