#!/usr/bin/env python3
# Helpers of bench/run-bench.sh: read fio's JSON and latency logs, and turn
# the raw measurements (one line per run) into the table, the CSV and the
# verdict on each performance target of docs/design.md.
#
#   bench-report.py fio FILE KEY...        print fio JSON values (a.b.c paths
#                                          under jobs[0], summed over jobs)
#   bench-report.py stall LATLOG WINDOWS DRAINS [IOLOG]
#                                          per-request latency of the writes
#                                          in flight while each snapshot was
#                                          being created, and a baseline;
#                                          with fio's I/O log, the gap in
#                                          completions around each creation
#   bench-report.py rate LATLOG T0 T1      requests/s completed in [T0, T1]
#   bench-report.py pull LATLOG T0 T1 SERIES LABEL
#                                          the same, with p50/p99 latency,
#                                          and the run over time to SERIES
#   bench-report.py report RAW CSV         aggregate, print, write the CSV
#   bench-report.py scale RAW CSV          the same for scale-bench.sh, with
#                                          a linear fit of each figure
#   bench-report.py prefault BYTES         touch BYTES of memory, free it
#   bench-report.py plots DIR [svg|png]    render the plots in DIR
#   bench-report.py section DIR            write DIR/results-section.md
#
# Only the standard library: python3 is already in scripts/install-deps.
# Every figure printed comes from RAW; a target whose inputs are missing is
# reported as "not measured", never estimated.

import csv
import json
import statistics
import sys


def load_fio_json(path):
    # fio prints warnings ("fio: ...") into --output before the JSON.
    with open(path) as f:
        text = f.read()
    return json.loads(text[text.index("{"):])


def cmd_fio(path, keys):
    jobs = load_fio_json(path)["jobs"]
    out = []
    for key in keys:
        total = 0.0
        for job in jobs:
            v = job
            for part in key.split("."):
                v = v[part]
            total += float(v)
        out.append("%.6g" % total)
    print(" ".join(out))


def pct(values, p):
    """Nearest-rank percentile, p in 0..100."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def read_windows(path):
    """WINDOWS: "t_before t_after" per command, wall clock in us."""
    windows = []
    with open(path) as f:
        for line in f:
            a, b = line.split()
            windows.append((int(a), int(b)))
    return sorted(windows)


def read_latlog(path):
    """fio latency log: (completion ms, latency ns, offset or None)."""
    out = []
    with open(path) as f:
        for line in f:
            fields = [x.strip() for x in line.split(",")]
            off = int(fields[4]) if len(fields) > 4 else None
            out.append((int(fields[0]), int(fields[1]), off))
    return out


def completions_us(lat, iolog_path):
    """Completion times to the microsecond, on the wall clock.

    fio 3.33 logs completion times in whole milliseconds only.  Its I/O
    log (--write_iolog, version 3) gives each request's issue time in
    microseconds since the job started, and the latency log its latency
    in nanoseconds, with the offset (--log_offset=1) to pair them: issue
    + latency is the completion on fio's clock to the microsecond.  That
    clock is tied to the wall clock by the millisecond timestamps: the
    offset must put every completion at or before the end of its logged
    millisecond, and at or after its start unless the log was late; half
    the width of the offsets that fit is the alignment uncertainty.  Returns
    (sorted completion times in us, uncertainty in us), or None if the
    logs do not pair up."""
    issues = {}
    with open(iolog_path) as f:
        for line in f:
            p = line.split()
            if len(p) == 5 and p[2] == "write":
                issues.setdefault(int(p[3]), []).append(int(p[0]))
    rel, ms = [], []
    for end_ms, lat_ns, off in lat:
        q = issues.get(off)
        if not q:
            return None
        rel.append(q.pop(0) + lat_ns / 1e3)
        ms.append(end_ms)
    if not rel:
        return None
    # fio stamps a request when it logs it, at or after its completion:
    # off + rel < ms * 1000 + 1000 always, and >= ms * 1000 unless the
    # log came late (a busy CPU).  Late ones say nothing of the offset.
    hi = min(m * 1000 + 1000 - r for m, r in zip(ms, rel))
    lows = [m * 1000 - r for m, r in zip(ms, rel)]
    lo = max((x for x in lows if x <= hi), default=None)
    if lo is None:
        return None
    # At least 2 us: both stamps are whole microseconds.
    off, unc = (lo + hi) / 2, max((hi - lo) / 2, 2.0)
    return sorted(r + off for r in rel), unc


def max_gap(times, a, b):
    """The longest interval between consecutive completions that overlaps
    [a, b] (both ends included, so a stall that starts before the window
    or ends after it counts whole)."""
    import bisect
    i = max(bisect.bisect_left(times, a) - 1, 0)
    j = min(bisect.bisect_right(times, b), len(times) - 1)
    best = 0.0
    for k in range(i, j):
        best = max(best, times[k + 1] - times[k])
    return best


def gap_stats(times, unc, windows, first_end_us):
    """Max gap in each window (widened by the alignment uncertainty), and
    the same over windows of the median length tiled over the base period:
    from 0.2 s after the first completion to 10 ms before the first
    window."""
    around = [max_gap(times, a - unc, b + unc) for a, b in windows]
    length = statistics.median(b - a for a, b in windows) + 2 * unc
    base = []
    t = times[0] + 200e3
    stop = (windows[0][0] if windows else first_end_us) - 10e3
    while t + length <= stop:
        base.append(max_gap(times, t, t + length))
        t += length
    return around, base


def cmd_stall(latlog, windows_path, drains_path, iolog=None):
    """fio --write_lat_log with --log_unix_epoch=1 --log_avg_msec=0: one
    line per request: completion time (ms since the epoch), latency (ns),
    direction, size, offset.  WINDOWS: "t_before t_after" per command
    (wall clock in microseconds around the fleecectl command).  DRAINS:
    the engine's last-drain-ns after each command.  A request is "around"
    a command when it was in flight at some point of that interval.  The
    baseline is every request completed before the first command.
    IOLOG (optional): fio's --write_iolog, for the gap in completions.
    Prints, in microseconds: base_p50 base_p99 base_max win_p50 win_p99
    win_max win_count drain_p50 drain_p99 drain_max, then gap_p50 gap_p99
    gap_max gapbase_p50 gapbase_p99 gapbase_max and the alignment
    uncertainty (nan without IOLOG)."""
    windows = read_windows(windows_path)
    wms = [(a // 1000, (b + 999) // 1000) for a, b in windows]
    lat = read_latlog(latlog)
    base, around = [], []
    first = wms[0][0] if wms else float("inf")
    for end_ms, lat_ns, _ in lat:
        start_ms = end_ms - lat_ns / 1e6
        if end_ms < first - 1:
            base.append(lat_ns / 1e3)
        # Completion times have 1 ms resolution: widen by 1 ms.
        for a, b in wms:
            if end_ms >= a and start_ms <= b + 1:
                around.append(lat_ns / 1e3)
                break
    with open(drains_path) as f:
        drains = [int(x) / 1e3 for x in f.read().split()]
    nan = float("nan")
    gaps, gbase, unc = [], [], nan
    c = completions_us(lat, iolog) if iolog else None
    if c:
        times, unc = c
        gaps, gbase = gap_stats(times, unc, windows, lat[-1][0] * 1000)
    print("%.1f %.1f %.1f %.1f %.1f %.1f %d %.1f %.1f %.1f "
          "%.1f %.1f %.1f %.1f %.1f %.1f %.1f" % (
              pct(base, 50), pct(base, 99), max(base, default=nan),
              pct(around, 50), pct(around, 99), max(around, default=nan),
              len(around), pct(drains, 50), pct(drains, 99),
              max(drains, default=nan),
              pct(gaps, 50), pct(gaps, 99), max(gaps, default=nan),
              pct(gbase, 50), pct(gbase, 99), max(gbase, default=nan),
              unc))


def cmd_pull(latlog, t0_us, t1_us, series, label):
    """The writer during a pull: requests/s completed in [T0, T1] (wall
    clock, us), and the p50 and p99 latency (us) of those requests, from
    a fio per-request log (--log_avg_msec=0 --log_unix_epoch=1).  Appends
    the whole run, in BUCKET_MS buckets, to SERIES: LABEL (comma
    separated fields), the bucket's start in ms from T0, the pull's end
    in ms from T0, requests/s, p50 and p99 latency (us) in the bucket.
    Prints "IOPS P50 P99"."""
    a, b = int(t0_us) / 1e3, int(t1_us) / 1e3
    inside = []
    buckets = {}
    with open(latlog) as f:
        for line in f:
            fields = line.split(",", 2)
            end_ms, lat_us = int(fields[0]), int(fields[1]) / 1e3
            if a <= end_ms <= b:
                inside.append(lat_us)
            buckets.setdefault(int((end_ms - a) // BUCKET_MS), []).append(
                lat_us)
    with open(series, "a") as f:
        # A bucket with no completion is a stall: 0 requests/s, latency
        # nan (a gap in the plot's line).
        for k in range(min(buckets, default=0), max(buckets, default=-1) + 1):
            v = buckets.get(k, [])
            f.write("%s,%d,%.0f,%.0f,%.1f,%.1f\n" % (
                label, k * BUCKET_MS, b - a, len(v) * 1000.0 / BUCKET_MS,
                pct(v, 50), pct(v, 99)))
    print("%.0f %.1f %.1f" % (len(inside) / ((b - a) / 1e3),
                              pct(inside, 50), pct(inside, 99)))


BUCKET_MS = 20


def cmd_prefault(nbytes):
    """Touch NBYTES of new anonymous memory, then free it: the pages the
    next allocations get are then ones the host has just provided
    (bench/PERF-NOTES.md, "Memory equalised before each run")."""
    import mmap
    n = int(nbytes)
    chunk = b"\1" * (1 << 20)
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, n - len(chunk) + 1, len(chunk)):
        m[off:off + len(chunk)] = chunk
    m.close()


def cmd_rate(latlog, t0_us, t1_us):
    """Requests per second completed in [t0, t1] (wall clock, us) in a fio
    per-request log written with --log_unix_epoch=1."""
    a, b = int(t0_us) / 1e3, int(t1_us) / 1e3
    n = 0
    with open(latlog) as f:
        for line in f:
            end_ms = int(line.split(",", 1)[0])
            if a <= end_ms <= b:
                n += 1
    print("%.0f" % (n / ((b - a) / 1e3)))


# ---- report ----

# Rows of a (scenario, metric) appear in this order of servers.
SERVERS = ["null", "nobackup", "file", "qemu-nbd", "qsd", "qsd-fleece", "fleece",
           "fleece-whole"]


def load_raw(path):
    data = {}
    order = []
    with open(path) as f:
        for row in csv.reader(f):
            if not row or row[0] == "scenario":
                continue
            scen, server, metric, unit, _run, value = row
            key = (scen, metric, server)
            if key not in data:
                data[key] = (unit, [])
                order.append(key)
            if value not in ("", "nan"):
                data[key][1].append(float(value))
    return data, order


def med(data, scen, metric, server):
    v = data.get((scen, metric, server))
    if not v or not v[1]:
        return None
    return statistics.median(v[1])


def fmt(x):
    if x is None:
        return "n/a"
    if abs(x) >= 100:
        return "%.0f" % x
    if abs(x) >= 10:
        return "%.1f" % x
    return "%.3g" % x


def build_rows(data, order):
    """One row per (scenario, metric, server); the ratio column of a peer
    row is Fleece's median divided by that peer's."""
    scens, metrics = [], []
    for scen, metric, _ in order:
        if scen not in scens:
            scens.append(scen)
        if (scen, metric) not in metrics:
            metrics.append((scen, metric))
    order = sorted(order, key=lambda k: (
        scens.index(k[0]), metrics.index((k[0], k[1])),
        SERVERS.index(k[2]) if k[2] in SERVERS else len(SERVERS)))
    rows = []
    for scen, metric, server in order:
        unit, values = data[(scen, metric, server)]
        m = statistics.median(values) if values else None
        ratio = None
        if server != "fleece":
            f = med(data, scen, metric, "fleece")
            if f is not None and m:
                ratio = f / m
        rows.append((scen, server, metric, unit, len(values), m, ratio,
                     values))
    return rows


def print_table(rows):
    hdr = ("scenario", "server", "metric", "unit", "n", "median",
           "fleece/peer")
    cells = [hdr] + [(r[0], r[1], r[2], r[3], str(r[4]), fmt(r[5]),
                      fmt(r[6]) if r[6] is not None else "")
                     for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(hdr))]
    for i, c in enumerate(cells):
        print("  ".join(x.ljust(w[j]) for j, x in enumerate(c)).rstrip())
        if i == 0:
            print("  ".join("-" * w[j] for j in range(len(hdr))))


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scenario", "server", "metric", "unit", "runs",
                    "median", "fleece_over_peer", "values", "verdict"])
        for r in rows:
            w.writerow([r[0], r[1], r[2], r[3], r[4],
                        "" if r[5] is None else "%.6g" % r[5],
                        "" if r[6] is None else "%.4g" % r[6],
                        " ".join("%.6g" % v for v in r[7]), ""])


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


# The snapshot pull under writes: (scenario, file system).
PULL_SCENARIOS = [("snap-pull-busy", "ext4"),
                  ("snap-pull-busy-tmpfs", "tmpfs")]

# Targets of issue 19 on it, each a ratio per run (same run index, the
# servers interleaved): (name, metric, numerator server or None for
# Fleece, denominator server, threshold, test).
PULL_TARGETS = [
    ("IOPS / floor's >= 0.6", "randwrite-4k", None, "file", 0.6,
     lambda r: r >= 0.6),
    ("IOPS / QEMU fleecing's >= 3", "randwrite-4k", None, "qsd-fleece", 3,
     lambda r: r >= 3),
    ("p99 / floor's <= 2", "lat-p99", None, "file", 2,
     lambda r: r <= 2),
]
PULL_INFO = ("IOPS / writer alone's", "randwrite-4k", None, "nobackup",
             None, None)


def load_runs(path):
    """RAW as {(scenario, metric, server): {run: value}}."""
    out = {}
    with open(path) as f:
        for row in csv.reader(f):
            if not row or row[0] == "scenario":
                continue
            scen, server, metric, _unit, run, value = row
            if value in ("", "nan"):
                continue
            out.setdefault((scen, metric, server), {})[run] = float(value)
    return out


def run_ratios(runs, scen, server, t):
    """Per-run ratios of SERVER (the numerator) against target T."""
    num = runs.get((scen, t[1], t[2] or server), {})
    den = runs.get((scen, t[1], t[3]), {})
    return [(r, num[r] / den[r]) for r in sorted(num, key=int)
            if r in den and den[r]]


def median_ratio(runs, scen, server, t):
    v = [x for _, x in run_ratios(runs, scen, server, t)]
    return statistics.median(v) if v else None


def targets(data, runs):
    """(description, measured text, met?) per target of docs/design.md."""
    out = []
    live = [("seqwrite-1m", "MiB/s"), ("seqwrite-64k", "MiB/s"),
            ("randwrite-4k", "IOPS"), ("seqread-1m", "MiB/s")]
    for metric, _ in live:
        r = ratio(med(data, "live-nosnap", metric, "fleece"),
                  med(data, "live-nosnap", metric, "file"))
        out.append(("live, no snapshot, %s vs nbdkit file >= 0.95" % metric,
                    r, None if r is None else r >= 0.95))
    for metric in ("seqwrite-1m", "randwrite-64k", "stride-4k"):
        r = ratio(med(data, "snap-firstwrite", metric, "fleece"),
                  med(data, "snap-firstwrite", metric, "qsd-fleece"))
        out.append(("first writes with a snapshot, %s vs QEMU fleecing "
                    ">= 1.5" % metric, r, None if r is None else r >= 1.5))
    r = ratio(med(data, "snap-read-idle", "nbdcopy", "fleece"),
              med(data, "snap-read-idle", "nbdcopy", "file"))
    out.append(("snapshot export full read vs nbdkit file read >= 0.9",
                r, None if r is None else r >= 0.9))
    for scen, fs in PULL_SCENARIOS:
        for server in ("fleece", "fleece-whole"):
            for t in PULL_TARGETS:
                r = median_ratio(runs, scen, server, t)
                out.append(("writes during a pull (%s), %s: %s" % (
                    fs, server, t[0]), r,
                    None if r is None else t[5](r)))
        r = median_ratio(runs, scen, "file", PULL_INFO)
        out.append(("  (%s, the floor's IOPS vs the writer alone: the "
                    "pull's own cost, info)" % fs, r, None))
    p99 = med(data, "snap-create-stall", "lat-around-p99", "fleece")
    out.append(("writer stall at snapshot creation, per-request p99 < 1 ms "
                "(us)", p99, None if p99 is None else p99 < 1000))
    c99 = med(data, "snap-create-stall", "lat-around-status-p99", "fleece")
    out.append(("  per-request p99, fleecectl status instead: the floor (us)",
                c99, None))
    d99 = med(data, "snap-create-stall", "drain-p99", "fleece")
    out.append(("  engine drain time p99 < 1 ms (us)",
                d99, None if d99 is None else d99 < 1000))
    g99 = med(data, "snap-create-stall", "gap-around-p99", "fleece")
    out.append(("  gap in completions around creation, p99 < 1 ms (us)",
                g99, None if g99 is None else g99 < 1000))
    for metric, desc in (
            ("gap-around-status-p99", "same windows, fleecectl status"),
            ("gap-base-p99", "equally long windows, no command")):
        v = med(data, "snap-create-stall", metric, "fleece")
        out.append(("    gap p99, %s (us)" % desc, v, None))
    r = ratio(med(data, "incremental", "incr-pull", "fleece"),
              med(data, "incremental", "full-pull", "fleece"))
    out.append(("incremental pull of 1% vs full pull <= 0.03",
                r, None if r is None else r <= 0.03))
    r = ratio(med(data, "repo", "convert-8", "qemu-img"),
              med(data, "repo", "restore-8", "fleece"))
    out.append(("restore of a point with 7 incrementals, speed vs qemu-img "
                "convert of the chain >= 0.9", r, None if r is None
                else r >= 0.9))
    r = ratio(med(data, "repo", "incr-point", "fleece"),
              med(data, "repo", "full-point", "fleece"))
    out.append(("incremental point of 1% vs full point (time) <= 0.05",
                r, None if r is None else r <= 0.05))
    v = med(data, "repo", "incr-file-pct", "fleece")
    out.append(("  its file, % of the disk <= 1.5", v,
                None if v is None else v <= 1.5))
    r = ratio(med(data, "repo", "compressed-bytes", "fleece"),
              med(data, "repo", "compressed-bytes", "qemu-img"))
    out.append(("compressed full point vs qemu-img convert -c, size <= 1.05",
                r, None if r is None else r <= 1.05))
    r = ratio(med(data, "repo", "compressed-full", "fleece"),
              med(data, "repo", "compressed-full", "qemu-img"))
    out.append(("  same, time <= 1.05", r, None if r is None else r <= 1.05))
    return out


def spread(values):
    if not values:
        return "n/a"
    return "%s [%s-%s]" % (fmt(statistics.median(values)), fmt(min(values)),
                           fmt(max(values)))


def print_pull(runs, ratios_path):
    """The writer during a pull, per server: medians and [min-max] of the
    runs; each target's ratio run by run (also to RATIOS_PATH, for the
    strip plot)."""
    rows = []
    for scen, fs in PULL_SCENARIOS:
        if not any(k[0] == scen for k in runs):
            continue
        print("Writes during a full pull (%s): median [min-max] of the runs"
              % fs)
        print("  %-13s %-26s %-26s %-26s %s" % (
            "server", "IOPS", "p50 us", "p99 us", "pull MiB/s"))
        for server in ("nobackup", "file", "qsd-fleece", "fleece-whole",
                       "fleece"):
            v = [list(runs.get((scen, m, server), {}).values()) for m in
                 ("randwrite-4k", "lat-p50", "lat-p99", "nbdcopy")]
            print("  %-13s %-26s %-26s %-26s %s" % (
                server, spread(v[0]), spread(v[1]), spread(v[2]),
                spread(v[3])))
        print("  per-run ratios:")
        for server in ("fleece", "fleece-whole"):
            for t in PULL_TARGETS:
                rr = run_ratios(runs, scen, server, t)
                print("    %-13s %-30s %s  (runs: %s)" % (
                    server, t[0], spread([x for _, x in rr]),
                    " ".join(fmt(x) for _, x in rr)))
                rows += [(fs, server, t[0], t[4], r, x) for r, x in rr]
        print()
    with open(ratios_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fs", "server", "target", "threshold", "run", "ratio"])
        for r in rows:
            w.writerow(r[:5] + ("%.4g" % r[5],))


def cmd_report(raw, csv_path):
    data, order = load_raw(raw)
    runs = load_runs(raw)
    rows = build_rows(data, order)
    print_table(rows)
    write_csv(rows, csv_path)
    print()
    print_pull(runs, csv_path[:-len(".csv")] + "-ratios.csv"
               if csv_path.endswith(".csv") else csv_path + "-ratios")
    print("Targets (docs/design.md, medians of one run):")
    for desc, value, ok in targets(data, runs):
        verdict = {True: "MET", False: "MISSED", None: ""}[ok]
        if value is None:
            verdict = "NOT MEASURED"
        print("  %-66s %8s  %s" % (desc, fmt(value), verdict))
    # The targets also go into the CSV, as rows of scenario "target": the
    # measured value (a ratio, or microseconds for the stall) as median.
    with open(csv_path, "a", newline="") as f:
        w = csv.writer(f)
        for desc, value, ok in targets(data, runs):
            verdict = "not measured" if value is None else \
                {True: "met", False: "missed", None: "info"}[ok]
            w.writerow(["target", "fleece", desc.strip(),
                        "us" if "(us)" in desc else "ratio", "",
                        "" if value is None else "%.4g" % value, "", "",
                        verdict])


# ---- scale-bench.sh ----

def fit(points):
    """Least squares y = a + b x over (x, y): (a, b, r2)."""
    n = len(points)
    if n < 2:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    a = my - b * mx
    syy = sum((y - my) ** 2 for _, y in points)
    r2 = 1.0 if syy == 0 else 1 - sum((y - a - b * x) ** 2
                                      for x, y in points) / syy
    return a, b, r2


def param_num(param, key):
    """The number after KEY= in PARAM ("disk=4.0T;cluster=4K"), in units
    (iec suffixes allowed), or None."""
    for part in param.split(";"):
        k, _, v = part.partition("=")
        if k == key:
            mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
            if v and v[-1] in mult:
                return float(v[:-1]) * mult[v[-1]]
            return float(v)
    return None


# How each figure grows: (figure, x key, what the slope is per, scale,
# unit of the slope).
SCALE_FITS = [
    ("start-s", "disk", "TiB of disk", 2 ** 40, "s"),
    ("rss-nosnap-anon", "disk", "TiB of disk", 2 ** 40, "B"),
    ("rss-copies-anon", "copies", "copied cluster", 1, "B"),
    ("store-bytes", "copies", "copied cluster", 1, "B"),
    ("create-s", "copies", "million copies", 1e6, "s"),
    ("restart-s", "copies", "million copies", 1e6, "s"),
    ("restart-rss-anon", "copies", "copied cluster", 1, "B"),
    ("incr-s", "changed", "million changed clusters", 1e6, "s"),
    ("incr-bytes", "changed", "changed cluster", 1, "B"),
]


def cmd_scale(raw, csv_path):
    groups, order = {}, []
    with open(raw) as f:
        for row in csv.DictReader(f):
            key = (row["figure"], row["param"], row["unit"])
            if key not in groups:
                groups[key] = []
                order.append(key)
            groups[key].append(float(row["value"]))
    print("%-18s %-34s %s" % ("figure", "param", "median [min-max] (runs)"))
    for key in order:
        v = groups[key]
        print("%-18s %-34s %s %s (%d)" % (key[0], key[1], spread(v), key[2],
                                          len(v)))
    print()
    print("How each grows (least squares over the medians; r2 near 1 = "
          "linear):")
    fits = []
    for fig, xkey, per, scale, unit in SCALE_FITS:
        by = {}
        for (f, param, _), v in groups.items():
            if f != fig:
                continue
            x = param_num(param, xkey)
            if x is None or "snapshots=0" in param:
                continue
            sub = ";".join(p for p in param.split(";")
                           if not p.startswith(xkey + "="))
            by.setdefault(sub, []).append((x, statistics.median(v)))
        for sub, pts in sorted(by.items()):
            r = fit(sorted(pts))
            if not r:
                continue
            a, b, r2 = r
            desc = fig + (" (" + sub + ")" if sub else "")
            print("  %-40s %s %s + %s %s per %s  (r2 %.3f, %d points)" % (
                desc, fmt(a), unit, fmt(b * scale), unit, per, r2,
                len(pts)))
            fits.append((desc, a, b * scale, unit, per, r2, len(pts)))
    # 1 % of the disk changed is more data than the run writes: the fits
    # of the incremental pull, extrapolated (and labelled so).
    disk = max([param_num(k[1], "disk") or 0 for k in order], default=0)
    extra = []
    for desc, a, b, unit, per, r2, n in fits:
        if desc in ("incr-s", "incr-bytes") and disk:
            x = 0.01 * disk / 4096
            extra.append(("%s, 1 %% of the disk (%.0f changed 4 KiB "
                          "clusters), extrapolated from the fit" % (desc, x),
                          a + b * x / 1e6 if desc == "incr-s" else a + b * x,
                          unit))
    for desc, v, unit in extra:
        print("  %s: %s %s" % (desc, fmt(v), unit))
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["figure", "param", "unit", "runs", "median", "min",
                    "max", "values"])
        for desc, v, unit in extra:
            w.writerow(["extrapolated", desc, unit, 0, "%.6g" % v,
                        "%.6g" % v, "%.6g" % v, ""])
        for key in order:
            v = groups[key]
            w.writerow([key[0], key[1], key[2], len(v),
                        "%.6g" % statistics.median(v), "%.6g" % min(v),
                        "%.6g" % max(v), " ".join("%.6g" % x for x in v)])
        for desc, a, b, unit, per, r2, n in fits:
            w.writerow(["fit", desc, unit, n, "%.6g" % a, "%.6g" % b,
                        "%.4f" % r2, "per " + per])


# ---- plots (gnuplot) and the results section ----

PULL_SERVERS = ["nobackup", "file", "qsd-fleece", "fleece-whole", "fleece"]
PULL_TITLES = {"nobackup": "writer alone (no backup)",
               "file": "floor (nbdkit file, pull of the disk)",
               "qsd-fleece": "QEMU fleecing",
               "fleece-whole": "Fleece, whole 64 KiB copies",
               "fleece": "Fleece, sub-cluster copies"}


def read_csv(path):
    try:
        with open(path) as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def median_run(runs, scen, server):
    """The run whose writer IOPS during the pull is the median one (the
    lower middle for an even count), or None."""
    v = runs.get((scen, "randwrite-4k", server), {})
    if not v:
        return None
    order = sorted(v, key=lambda r: (v[r], int(r)))
    return order[(len(order) - 1) // 2]


def gnuplot(script, out):
    import subprocess
    p = subprocess.run(["gnuplot"], input=script, text=True,
                       capture_output=True)
    if p.returncode != 0:
        sys.stderr.write("bench-report.py: gnuplot for %s failed:\n%s" % (
            out, p.stderr))
        sys.exit(1)
    sys.stderr.write("bench-report.py: wrote %s\n" % out)


# "svg" (the default: text, for RESULTS.md) or "png" (pngcairo).
FORMAT = ["svg"]


def term(height):
    if FORMAT[0] == "png":
        return "set terminal pngcairo size 900,%d font 'sans,9'\n" % height
    return "set terminal svg size 900,%d dynamic font 'sans,11'\n" % height


def image(d, name):
    import os
    return os.path.join(d, "%s.%s" % (name, FORMAT[0]))


def plot_pull_latency(d, runs, series, scen, fs):
    import os
    plots_p99, plots_iops = [], []
    for server in PULL_SERVERS:
        r = median_run(runs, scen, server)
        rows = [x for x in series if x["scenario"] == scen and
                x["server"] == server and x["run"] == r]
        if not rows:
            continue
        dat = os.path.join(d, "plot-data", "lat-%s-%s.dat" % (fs, server))
        with open(dat, "w") as f:
            for x in rows:
                f.write("%.3f %s %s %s\n" % (int(x["t_ms"]) / 1e3,
                                             x["p99_us"], x["p50_us"],
                                             x["iops"]))
        pull = int(rows[0]["pull_ms"]) / 1e3
        t = "%s, run %s, %s %.2f s" % (
            PULL_TITLES[server], r,
            "window" if server == "nobackup" else "pull", pull)
        plots_p99.append("'%s' using 1:2 with lines lw 1.5 title '%s'" % (
            dat, t))
        plots_iops.append("'%s' using 1:($4/1000) with lines lw 1.5 "
                          "notitle" % dat)
    if not plots_p99:
        return None
    # The axis covers the longest pull (the writer alone's window is
    # longer and would squeeze the pulls to the left).
    xmax = max([int(x["pull_ms"]) / 1e3 for x in series
                if x["scenario"] == scen and x["server"] != "nobackup"],
               default=2.0) + 0.3
    out = image(d, "pull-latency-" + fs)
    gnuplot(term(700) + """set output '%s'
set multiplot layout 2,1 title 'Writes (fio 4 KiB random, iodepth 32) during a full pull, %s; median run of each server'
set grid
set logscale y
set ylabel 'p99 latency per 20 ms (us)'
set key top right font ',9'
set xrange [-0.4:%.2f]
plot %s
unset logscale y
set ylabel 'writes completed (k IOPS)'
set xlabel 'seconds since the pull started (0 = nbdcopy starts)'
plot %s
unset multiplot
""" % (out, fs, xmax, ", ".join(plots_p99), ", ".join(plots_iops)), out)
    return os.path.basename(out)


def plot_ratios(d, ratios):
    import os
    cats = []
    for x in ratios:
        c = (x["fs"], x["server"], x["target"], float(x["threshold"]))
        if c not in cats:
            cats.append(c)
    if not cats:
        return None
    pts = os.path.join(d, "plot-data", "ratios.dat")
    thr = os.path.join(d, "plot-data", "ratios-thresholds.dat")
    with open(pts, "w") as f:
        for x in ratios:
            i = cats.index((x["fs"], x["server"], x["target"],
                            float(x["threshold"])))
            # A small spread across x per run, so equal values stay apart.
            f.write("%.3f %s\n" % (i + 0.08 * (int(x["run"]) % 5 - 2),
                                   x["ratio"]))
    with open(thr, "w") as f:
        for i, c in enumerate(cats):
            f.write("%.2f %g 0.8 0\n" % (i - 0.4, c[3]))
    tics = ", ".join("'%s %s: %s' %d" % (c[0], "sub" if c[1] == "fleece"
                                         else "whole", c[2].replace("'", ""),
                                         i)
                     for i, c in enumerate(cats))
    out = image(d, "pull-ratios")
    gnuplot(term(600) + """set output '%s'
set title 'Fleece against each target, one point per run (line: the target; IOPS above it, p99 below it is met)'
set grid ytics
set logscale y
set ylabel 'ratio'
set xrange [-0.6:%.1f]
set xtics (%s) rotate by 35 right font ',9'
set bmargin 12
set lmargin 16
plot '%s' using 1:2 with points pt 7 ps 0.8 lc rgb 'blue' title 'a run', \
     '%s' using 1:2:3:4 with vectors nohead lw 2 lc rgb 'red' title 'target'
""" % (out, len(cats) - 0.4 + 0.2, tics, pts, thr), out)
    return os.path.basename(out)


def plot_store(d, store):
    import os
    lines = []
    keys = []
    for x in store:
        k = (x["mode"], x["run"])
        if k not in keys:
            keys.append(k)
    for mode, run in keys:
        dat = os.path.join(d, "plot-data", "store-%s-%s.dat" % (mode, run))
        with open(dat, "w") as f:
            for x in store:
                if (x["mode"], x["run"]) == (mode, run):
                    f.write("%.3f %.3f %.3f\n" % (
                        int(x["t_ms"]) / 1e3, int(x["store_bytes"]) / 2 ** 20,
                        int(x.get("alloc_bytes") or 0) / 2 ** 20))
        title = "%s, run %s" % ("without --discard-source" if mode == "keep"
                                else "with --discard-source", run)
        lc = 1 if mode == "keep" else 2
        lines.append("'%s' using 1:2 with lines lw 1.5 lc %d title '%s: in "
                     "use'" % (dat, lc, title))
        lines.append("'%s' using 1:3 with lines lw 1 dt 2 lc %d title '%s: "
                     "file blocks'" % (dat, lc, title))
    if not lines:
        return None
    out = image(d, "store-discard")
    gnuplot(term(450) + """set output '%s'
set title 'Store in use while fleece-backup pulls the snapshot under 4 KiB random writes (8000 IOPS)'
set grid
set xlabel 'seconds since the pull started'
set ylabel 'store (MiB)'
set key top left
plot %s
""" % (out, ", ".join(lines)), out)
    return os.path.basename(out)


def plot_scale(d, scale):
    import os
    pts = {"rss-copies-anon": [], "restart-s": [], "create-s": []}
    for x in scale:
        if x["figure"] in pts and "snapshots=0;" not in x["param"]:
            n = param_num(x["param"], "copies")
            if n is not None:
                pts[x["figure"]].append((n, float(x["median"]),
                                         float(x["min"]), float(x["max"])))
    if not pts["rss-copies-anon"]:
        return None
    files = {}
    for k, v in pts.items():
        files[k] = os.path.join(d, "plot-data", "scale-%s.dat" % k)
        with open(files[k], "w") as f:
            for n, m, lo, hi in sorted(v):
                f.write("%g %g %g %g\n" % (n, m, lo, hi))
    out = image(d, "scale-copies")
    gnuplot(term(450) + """set output '%s'
set multiplot layout 1,2 title 'Cost against copied clusters (4 KiB clusters, 4 TiB sparse disk)'
set grid
set xlabel 'copied clusters'
set ylabel 'nbdkit anonymous RSS, 10 snapshots (MiB)'
plot '%s' using 1:($2/1048576) with linespoints pt 7 notitle
set ylabel 'seconds'
set key top left
plot '%s' using 1:2:3:4 with yerrorlines pt 7 title 'restart (persistent store)', \
     '%s' using 1:2 with linespoints pt 5 title 'snapshot creation'
unset multiplot
""" % (out, files["rss-copies-anon"], files["restart-s"],
       files["create-s"]), out)
    return os.path.basename(out)


def cmd_plots(d):
    import os
    os.makedirs(os.path.join(d, "plot-data"), exist_ok=True)
    raw = os.path.join(d, "results-raw.csv")
    runs = load_runs(raw) if os.path.exists(raw) else {}
    series = read_csv(os.path.join(d, "pull-series.csv"))
    made = []
    for scen, fs in PULL_SCENARIOS:
        made.append(plot_pull_latency(d, runs, series, scen, fs))
    made.append(plot_ratios(d, read_csv(os.path.join(d,
                                                     "results-ratios.csv"))))
    made.append(plot_store(d, read_csv(os.path.join(d, "store-series.csv"))))
    made.append(plot_scale(d, read_csv(os.path.join(d,
                                                    "scale-results.csv"))))
    return [m for m in made if m]


def cmd_section(d):
    """DIR/results-section.md: the issue-19 figures of this run as
    Markdown, with the plots, for RESULTS.md."""
    import os
    raw = os.path.join(d, "results-raw.csv")
    runs = load_runs(raw) if os.path.exists(raw) else {}
    out = []
    w = out.append
    w("<!-- written by bench-report.py section: paste into RESULTS.md -->")
    w("## Writes during a full pull (issue 19)")
    w("")
    w("fio 4 KiB random writes, iodepth 32, per-request latency; nbdcopy "
      "pulls the whole snapshot 0.3 s after fio has started writing. "
      "Figures are of the writes completed during the pull: median "
      "[min–max] of the runs, servers interleaved, memory equalised "
      "before each server (PERF-NOTES.md).")
    for scen, fs in PULL_SCENARIOS:
        if not any(k[0] == scen for k in runs):
            continue
        w("")
        w("### %s" % fs)
        w("")
        w("| server | IOPS | p50 µs | p99 µs | pull MiB/s |")
        w("|---|---|---|---|---|")
        for server in PULL_SERVERS:
            v = [list(runs.get((scen, m, server), {}).values()) for m in
                 ("randwrite-4k", "lat-p50", "lat-p99", "nbdcopy")]
            w("| %s | %s |" % (PULL_TITLES[server], " | ".join(
                spread(x) for x in v)))
        w("")
        w("| target (ratio per run) | server | median [min–max] | runs | "
          "verdict |")
        w("|---|---|---|---|---|")
        for server in ("fleece", "fleece-whole"):
            for t in PULL_TARGETS:
                rr = [x for _, x in run_ratios(runs, scen, server, t)]
                verdict = "not measured" if not rr else (
                    "met" if t[5](statistics.median(rr)) else "missed")
                w("| %s | %s | %s | %s | %s |" % (
                    t[0], server, spread(rr),
                    " ".join(fmt(x) for x in rr), verdict))
        if os.path.exists(os.path.join(d, "pull-latency-%s.svg" % fs)):
            w("")
            w("![write latency during the pull, %s](pull-latency-%s.svg)"
              % (fs, fs))
    if os.path.exists(os.path.join(d, "pull-ratios.svg")):
        w("")
        w("![per-run ratio against each target](pull-ratios.svg)")
    disc = {k: v for k, v in runs.items() if k[0] == "store-discard"}
    if disc:
        w("")
        w("## The store during a pull, with and without --discard-source")
        w("")
        w("| | store in use, peak MiB | in use at the end MiB | "
          "file blocks, peak MiB | pull s |")
        w("|---|---|---|---|---|")
        for server in ("fleece-keep", "fleece-discard"):
            w("| %s | %s |" % (
                "with --discard-source" if server == "fleece-discard"
                else "without", " | ".join(
                    spread(list(disc.get(("store-discard", m, server),
                                         {}).values()))
                    for m in ("store-peak", "store-end", "file-peak",
                              "pull"))))
        w("")
        w("![store size during a pull](store-discard.svg)")
    scale = read_csv(os.path.join(d, "scale-results.csv"))
    if scale:
        w("")
        w("## How the costs grow (4 TiB sparse disk, scale-bench.sh)")
        w("")
        w("| figure | param | median [min–max] | unit | runs |")
        w("|---|---|---|---|---|")
        for x in scale:
            if x["figure"] != "fit":
                w("| %s | %s | %s [%s–%s] | %s | %s |" % (
                    x["figure"], x["param"], fmt(float(x["median"])),
                    fmt(float(x["min"])), fmt(float(x["max"])), x["unit"],
                    x["runs"]))
        w("")
        w("| figure | fit: a + b per unit | r² | points |")
        w("|---|---|---|---|")
        for x in scale:
            if x["figure"] == "fit":
                w("| %s | %s %s + %s %s %s | %s | %s |" % (
                    x["param"], fmt(float(x["median"])), x["unit"],
                    fmt(float(x["min"])), x["unit"], x["values"],
                    x["max"], x["runs"]))
        if os.path.exists(os.path.join(d, "scale-copies.svg")):
            w("")
            w("![cost against copied clusters](scale-copies.svg)")
    path = os.path.join(d, "results-section.md")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    sys.stderr.write("bench-report.py: wrote %s\n" % path)


def main(argv):
    if len(argv) >= 3 and argv[1] == "fio":
        cmd_fio(argv[2], argv[3:])
    elif len(argv) == 7 and argv[1] == "pull":
        cmd_pull(*argv[2:])
    elif len(argv) == 4 and argv[1] == "scale":
        cmd_scale(argv[2], argv[3])
    elif len(argv) in (3, 4) and argv[1] == "plots":
        FORMAT[0] = argv[3] if len(argv) == 4 else "svg"
        if FORMAT[0] not in ("svg", "png"):
            sys.stderr.write("bench-report.py: plots: svg or png\n")
            return 1
        cmd_plots(argv[2])
    elif len(argv) == 3 and argv[1] == "section":
        cmd_section(argv[2])
    elif len(argv) == 3 and argv[1] == "prefault":
        cmd_prefault(argv[2])
    elif len(argv) == 5 and argv[1] == "rate":
        cmd_rate(argv[2], argv[3], argv[4])
    elif len(argv) in (5, 6) and argv[1] == "stall":
        cmd_stall(*argv[2:])
    elif len(argv) == 4 and argv[1] == "report":
        cmd_report(argv[2], argv[3])
    else:
        sys.stderr.write("usage: bench-report.py fio|rate|stall|report ...\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
