import sys, collections
ws=[tuple(map(int,l.split())) for l in open(sys.argv[2])]
rows=[]
for l in open(sys.argv[1]):
    if not l.startswith('SLOW'): continue
    f=l.split(); t=int(f[1]); d=dict(x.split('=') for x in f[2:]); d={k:int(v) for k,v in d.items()}
    rows.append((t,d))
def dom(d):
    keys=['gate','rl','snl','pread','alloc','store','ins','pw']
    other=d['cbw']-d['rl']-d['snl']-d['pread']-d['alloc']-d['store']-d['ins']
    vals={k:d[k] for k in keys}; vals['cbw-other']=other; vals['unacc']=d['tot']-d['gate']-d['cbw']-d['pw']
    return max(vals,key=vals.get)
for name,sel in (("all",lambda t:True),("in-window",lambda t:any(a-2000<=t<=b+3000 for a,b in ws))):
    c=collections.Counter(); sums=collections.Counter(); n=0
    for t,d in rows:
        if not sel(t): continue
        n+=1; c[dom(d)]+=1
        for k,v in d.items(): sums[k]+=v
    print(name, n, dict(c.most_common()), {k:v//max(n,1) for k,v in sums.items()})
