#!/usr/bin/env python3
# Helpers of bench/run-bench.sh: read fio's JSON and latency logs, and turn
# the raw measurements (one line per run) into the table, the CSV and the
# verdict on each performance target of DESIGN.md.
#
#   bench-report.py fio FILE KEY...        print fio JSON values (a.b.c paths
#                                          under jobs[0], summed over jobs)
#   bench-report.py stall LATLOG WINDOWS   per-request latency of the writes
#                                          in flight while each snapshot was
#                                          being created, and a baseline
#   bench-report.py rate LATLOG T0 T1      requests/s completed in [T0, T1]
#   bench-report.py report RAW CSV         aggregate, print, write the CSV
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


def cmd_stall(latlog, windows_path, drains_path):
    """fio --write_lat_log with --log_unix_epoch=1 --log_avg_msec=0: one
    line per request: completion time (ms since the epoch), latency (ns),
    direction, size, offset.  WINDOWS: "t_before_ms t_after_ms" per
    snapshot creation (wall clock in microseconds around the fleecectl
    command).  DRAINS: the engine's last-drain-ns after each creation.  A request
    is "around creation" when it was in flight at some point of that
    interval.  The baseline is every request completed before the first
    creation.  Prints: base_p50 base_p99 base_max win_p50 win_p99 win_max
    win_count drain_p50 drain_p99 drain_max, in microseconds."""
    windows = []
    with open(windows_path) as f:
        for line in f:
            a, b = line.split()
            windows.append((int(a) // 1000, (int(b) + 999) // 1000))
    windows.sort()
    base, around = [], []
    first = windows[0][0] if windows else float("inf")
    with open(latlog) as f:
        for line in f:
            fields = [x.strip() for x in line.split(",")]
            end_ms, lat_ns = int(fields[0]), int(fields[1])
            start_ms = end_ms - lat_ns / 1e6
            if end_ms < first - 1:
                base.append(lat_ns / 1e3)
            # Completion times have 1 ms resolution: widen by 1 ms.
            for a, b in windows:
                if end_ms >= a and start_ms <= b + 1:
                    around.append(lat_ns / 1e3)
                    break
    with open(drains_path) as f:
        drains = [int(x) / 1e3 for x in f.read().split()]
    print("%.1f %.1f %.1f %.1f %.1f %.1f %d %.1f %.1f %.1f" % (
        pct(base, 50), pct(base, 99), max(base, default=float("nan")),
        pct(around, 50), pct(around, 99), max(around, default=float("nan")),
        len(around), pct(drains, 50), pct(drains, 99),
        max(drains, default=float("nan"))))


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
SERVERS = ["null", "file", "qemu-nbd", "qsd", "qsd-fleece", "fleece"]


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


def targets(data):
    """(description, measured text, met?) per DESIGN.md target."""
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
    f = med(data, "snap-pull-busy", "randwrite-4k", "fleece")
    q = med(data, "snap-pull-busy", "randwrite-4k", "qsd-fleece")
    r = ratio(f, q)
    out.append(("live 4K random writes during a snapshot pull vs QEMU "
                "fleecing >= 3", r, None if r is None else r >= 3))
    r = ratio(f, med(data, "live-nosnap", "randwrite-4k", "fleece"))
    out.append(("  same, vs Fleece's own no-snapshot rate >= 0.5",
                r, None if r is None else r >= 0.5))
    r2 = ratio(q, med(data, "live-nosnap", "randwrite-4k", "qsd"))
    out.append(("  (QEMU fleecing, vs its own no-snapshot rate: info)",
                r2, None))
    p99 = med(data, "snap-create-stall", "lat-around-p99", "fleece")
    out.append(("writer stall at snapshot creation p99 < 1 ms (us)",
                p99, None if p99 is None else p99 < 1000))
    d99 = med(data, "snap-create-stall", "drain-p99", "fleece")
    out.append(("  engine drain time p99 < 1 ms (us)",
                d99, None if d99 is None else d99 < 1000))
    r = ratio(med(data, "incremental", "incr-pull", "fleece"),
              med(data, "incremental", "full-pull", "fleece"))
    out.append(("incremental pull of 1% vs full pull <= 0.03",
                r, None if r is None else r <= 0.03))
    return out


def cmd_report(raw, csv_path):
    data, order = load_raw(raw)
    rows = build_rows(data, order)
    print_table(rows)
    write_csv(rows, csv_path)
    print()
    print("Targets (DESIGN.md, medians of one run):")
    for desc, value, ok in targets(data):
        verdict = {True: "MET", False: "MISSED", None: ""}[ok]
        if value is None:
            verdict = "NOT MEASURED"
        print("  %-66s %8s  %s" % (desc, fmt(value), verdict))
    # The targets also go into the CSV, as rows of scenario "target": the
    # measured value (a ratio, or microseconds for the stall) as median.
    with open(csv_path, "a", newline="") as f:
        w = csv.writer(f)
        for desc, value, ok in targets(data):
            verdict = "not measured" if value is None else \
                {True: "met", False: "missed", None: "info"}[ok]
            w.writerow(["target", "fleece", desc.strip(),
                        "us" if "(us)" in desc else "ratio", "",
                        "" if value is None else "%.4g" % value, "", "",
                        verdict])


def main(argv):
    if len(argv) >= 3 and argv[1] == "fio":
        cmd_fio(argv[2], argv[3:])
    elif len(argv) == 5 and argv[1] == "rate":
        cmd_rate(argv[2], argv[3], argv[4])
    elif len(argv) == 5 and argv[1] == "stall":
        cmd_stall(argv[2], argv[3], argv[4])
    elif len(argv) == 4 and argv[1] == "report":
        cmd_report(argv[2], argv[3])
    else:
        sys.stderr.write("usage: bench-report.py fio|rate|stall|report ...\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
