import sys
log, win = sys.argv[1], sys.argv[2]
reqs=[]
for line in open(log):
    f=[x.strip() for x in line.split(',')]
    reqs.append((int(f[0]), int(f[1])/1e3))
for line in open(win):
    a,b=map(int,line.split()); a//=1000; b=(b+999)//1000
    print("window %d ms" % (b-a))
    # completions per ms from a-2 to b+15, with max lat
    for t in range(a-2, b+15):
        l=[lat for (e,lat) in reqs if e==t]
        print("  t%+4d n=%3d max=%8.0f" % (t-a, len(l), max(l) if l else 0))
