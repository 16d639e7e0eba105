#!/usr/bin/env bash
# The docs say what the code does: shell examples in the man pages and
# docs quote the URIs that hold a '?' (a glob character to the shell),
# control-protocol.md promises no member order that the server does not
# keep, and bitmap-export.md does not say that bitmaps never survive
# nbdkit (they do with persistent=true).
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires python3 --version

src=${abs_top_srcdir:-..}

# --- unquoted URIs with '?' in examples ---
# Pod verbatim lines (indented) and Markdown code blocks are examples;
# a URI is quoted when an odd number of ' or " precede it on its line.
cat >"$tmp/uris.py" <<'EOF'
import re, sys
bad = []
for path in sys.argv[1:]:
    in_code = False
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if path.endswith(".md") and line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if not (in_code or (path.endswith(".pod") and line[:1] in " \t")):
            continue
        for m in re.finditer(r"nbds?(\+unix|\+vsock)?://\S*\?", line):
            before = line[:m.start()]
            if before.count("'") % 2 == 0 and before.count('"') % 2 == 0:
                bad.append("%s:%d: %s" % (path, n, line.strip()))
print("\n".join(bad))
sys.exit(1 if bad else 0)
EOF
ok "every example URI with '?' is quoted" \
   python3 "$tmp/uris.py" "$src"/tools/*.pod "$src"/tools/backup/*.pod \
   "$src"/plugin/*.pod "$src"/colo/*.pod "$src"/docs/*.md "$src"/README.md

# --- control-protocol.md and the server's member order ---
disk=$tmp/disk
truncate -s 4M "$disk"
ok "nbdkit starts" start_nbdkit s -- disk="$disk" store="$tmp/store" \
   control="$tmp/s.ctl"
ok "checkpoint c1" ctl s checkpoint c1
ok "checkpoint c2" ctl s checkpoint c2
ctl s raw '{"execute":"query-bitmaps"}' >"$tmp/bitmaps.json"
cat >"$tmp/order.py" <<'EOF'
import json, re, sys
doc = open(sys.argv[1], encoding="utf-8").read()
reply = json.load(open(sys.argv[2]))["return"]
# The documented members of query-bitmaps, in the table's order.
sec = doc.split("### `query-bitmaps`", 1)[1].split("\n#", 1)[0]
documented = re.findall(r"^\| `([a-z-]+)` \|", sec, re.M)
got = list(reply[0].keys())
missing = [k for k in got if k not in documented]
if missing:
    print("members the table does not list:", missing)
    sys.exit(1)
if re.search(r"in\s+the\s+order\s+this\s+document\s+lists\s+them", doc):
    want = [k for k in documented if k in got]
    if got != want:
        print("the document promises member order", want, "the server sends", got)
        sys.exit(1)
print("members:", got)
EOF
ok "control-protocol.md and query-bitmaps agree (members, order)" \
   python3 "$tmp/order.py" "$src/docs/control-protocol.md" "$tmp/bitmaps.json"
ok "nbdkit stops cleanly" stop_nbdkit s

# --- bitmap-export.md on what survives nbdkit ---
ok "bitmap-export.md does not say bitmaps never survive nbdkit" \
   sh -c "! grep -q 'In this version snapshots and' '$src/docs/bitmap-export.md'"
ok "bitmap-export.md says persistent=true keeps them" \
   grep -q 'With `persistent=true` they survive' "$src/docs/bitmap-export.md"

# --- HACKING's "Where is X?" table names files that exist ---
# The rows are the section's indented lines after the dashes; the file
# is each row's last word.  A table that lost its rows fails too.
cat >"$tmp/where.py" <<'EOF2'
import os, re, sys
src, doc = sys.argv[1], open(sys.argv[2], encoding="utf-8").read()
m = re.search(r"^Where is X\?\n-+\n(.*?)\n\S[^\n]*\n-+\n", doc, re.S | re.M)
if m is None:
    print("docs/HACKING has no 'Where is X?' section")
    sys.exit(1)
rows = m.group(1).split("\n  ---", 1)[-1].split("\n")[1:]
files = [r.split()[-1] for r in rows if r.startswith("  ") and r.strip()]
missing = [f for f in files if not os.path.isfile(os.path.join(src, f))]
print("%d files named" % len(files))
if len(files) < 10 or missing:
    print("missing:", missing)
    sys.exit(1)
EOF2
ok "every file HACKING's 'Where is X?' names exists" \
   python3 "$tmp/where.py" "$src" "$src/docs/HACKING"
