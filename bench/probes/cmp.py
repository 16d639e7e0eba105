import sys
log, win = sys.argv[1], sys.argv[2]
ws=[]
for line in open(win):
    a,b=map(int,line.split()); ws.append((a//1000,(b+999)//1000))
first=ws[0][0]; last=ws[-1][1]+300
ins, outs, base = [], [], []
for line in open(log):
    f=[x.strip() for x in line.split(',')]
    e=int(f[0]); lat=int(f[1])/1e3; s=e-lat/1e3
    if e < first-1: base.append(lat); continue
    if e > last: continue
    if any(e>=a and s<=b+1 for a,b in ws): ins.append(lat)
    else: outs.append(lat)
def pct(v,p):
    v=sorted(v); return v[min(len(v)-1,int(p/100*len(v)))] if v else float('nan')
for n,v in (("base",base),("around",ins),("between",outs)):
    print("%-8s n=%6d p50=%7.0f p90=%7.0f p99=%7.0f max=%7.0f" % (n,len(v),pct(v,50),pct(v,90),pct(v,99),max(v) if v else 0))
