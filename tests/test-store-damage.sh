#!/usr/bin/env bash
# Damaged persistent stores (docs/store-format.md, "Resilience"): each is
# either refused, with a message naming the store and what was found and
# the file left as it was, or loaded with the snapshots that lost data
# marked broken (their exports fail reads with EIO, `fleecectl snapshot
# list` and nbdkit's log say why).  Never a snapshot that differs silently
# from the disk at its creation, never a store formatted over.
#   - truncated by one byte inside its last copy slot;
#   - one byte of the superblock's magic changed (either mode);
#   - truncated below the 4 KiB superblock;
#   - the checksum of the last log record corrupted;
#   - somebody else's file given as the store;
# and what may be formatted: an empty file, a file of zeroes.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires qemu-img --version
requires nbdcopy --version
requires python3 --version

persistent_setup
snapinfo () { jget "$(ctl p --json snapshot list)" "[s['$2'] for s in d if s['name'] == '$1'][0]"; }
# refused DESC PATTERN [plugin args]: nbdkit refuses to start on $store,
# with a message naming it and matching PATTERN, and leaves it unchanged.
refused ()
{
  local desc=$1 pattern=$2 before; shift 2
  before=$(sum "$store")
  ok_fails "$desc: refused" "$store: .*$pattern" \
    nbdkit_once -f -U "$tmp/x.sock" "$FLEECE_PLUGIN" disk="$disk" \
    store="$store" control="$tmp/x.ctl" "$@"
  is "$(sum "$store")" "$before" "$desc: the store is left as it was"
}
# same_as SNAPSHOT REF: the snapshot's export equals REF (qemu-img compare).
same_as () { qemu-img compare -f raw -F raw "$(snap_uri p "$1")" "$2"; }

# --- 1. truncated inside its last copy slot ---
# a's copies go first, then an image, then the copies that only b reads
# (the same clusters, written again after b): the last slot is b's.
ok "start on a new store" start
ok "snapshot create a" ctl p snapshot create a
pull p a "$tmp/a.ref"
ok "writes that copy for a" qio p "" "write -P 0x31 0 1M"
ok "snapshot create b" ctl p snapshot create b
pull p b "$tmp/b.ref"
ok "writes that copy for b alone" qio p "" "write -P 0x41 0 1M"
crash
size=$(stat -c %s "$store")
diag "store: $size bytes; data area from 4259840: $(( (size - 4259840) / 65536 )) slots"
is "$(( (size - 4259840) % 65536 ))" 0 "the store ends at the end of a slot"
truncate -s -1 "$store"
ok "nbdkit starts on the store truncated by one byte" start
is "$(snapinfo b broken)" True "b, whose copy was in the lost slot, is broken"
reason=$(snapinfo b broken-reason)
diag "b: $reason"
ok "the reason says the store was truncated" grep -q "store was truncated" <<<"$reason"
ok "nbdkit's log names b" grep -q "snapshot 'b' is broken" "$tmp/p.log"
ok_fails "b's export fails reads with EIO" "Input/output error" qio p snapshot/b "read 0 1M"
is "$(snapinfo a broken)" False "a, whose copies are all there, is not broken"
ok "a equals the disk at its creation" same_as a "$tmp/a.ref"
ok "nbdkit stops cleanly" stop_nbdkit p
ok "after a restart" start
is "$(snapinfo b broken)" True "b stays broken"
ok "a still exact" same_as a "$tmp/a.ref"
ok "nbdkit stops cleanly" stop_nbdkit p
cp "$store" "$tmp/store.good"

# A clean stop writes its last image after the copies: a byte cut off
# it leaves nothing to load.  (Another disk and store, so that a's disk
# is only ever written through a's store.)
disk=$tmp/disk2 store=$tmp/store2
make_disk "$disk" 8M 0x22
ok "start on another new store" start
ok "snapshot create s" ctl p snapshot create s
ok "writes that copy for s" qio p "" "write -P 0x61 0 1M"
ok "nbdkit stops cleanly" stop_nbdkit p
truncate -s -1 "$store"
refused "cut inside the image written at a clean stop" "STATE record points outside the store: its image ends at byte [0-9]+, the store has [0-9]+ \\(it was truncated\\)" persistent=true
disk=$tmp/disk store=$tmp/store

# --- 2. one byte of the superblock's magic ---
python3 -c '
import sys
f = open(sys.argv[1], "r+b"); f.seek(3); f.write(b"X")' "$store"
refused "the superblock's magic changed" "magic is damaged .*FLEXCEST.*refusing to format it" persistent=true
refused "the same with persistent=false" "magic is damaged" persistent=false
# The superblock's other bytes damaged too: the log still says what it is.
python3 -c '
import sys
f = open(sys.argv[1], "r+b"); f.seek(0); f.write(b"\xff" * 112)' "$store"
refused "the whole superblock overwritten" "no valid superblock.*its metadata log holds records" persistent=true
cp "$tmp/store.good" "$store"
ok "the good store still loads" start
ok "a still exact" same_as a "$tmp/a.ref"
ok "nbdkit stops cleanly" stop_nbdkit p

# --- 3. truncated below 4 KiB ---
truncate -s 4000 "$store"
refused "a store of 4000 bytes" "is 4000 bytes long, shorter than a store's 4096-byte superblock.*truncated store" persistent=true
refused "the same with persistent=false" "shorter than a store's 4096-byte superblock" persistent=false
cp "$tmp/store.good" "$store"

# --- 4. the checksum of the last log record ---
# last_record STORE: flip a byte of the checksum of the last record of
# the active half (the one whose STATE has the higher sequence).
last_record ()
{
  python3 - "$1" <<'EOF'
import struct, sys
f = open(sys.argv[1], "r+b")
HALF = 2 * 1024 * 1024
def records(base):
    f.seek(base); d = f.read(HALF); pos = 0; out = []
    while pos + 32 <= HALF and d[pos:pos+4] == b"FLMR":
        typ, flags, ln, res, seq = struct.unpack_from("<HHIIQ", d, pos + 4)
        out.append((pos, typ, seq))
        pos += 32 + ((ln + 7) & ~7)
    return out
halves = [records(4096 + h * HALF) for h in (0, 1)]
act = max((0, 1), key=lambda h: halves[h][0][2] if halves[h] and halves[h][0][1] == 1 else -1)
recs = halves[act]
assert len(recs) > 1, "no record after the STATE"
pos, typ, seq = recs[-1]
print("last record: type 0x%x, sequence %d, at %d of half %d" % (typ, seq, pos, act))
off = 4096 + act * HALF + pos + 24
f.seek(off); b = f.read(1); f.seek(off); f.write(bytes([b[0] ^ 0x01]))
EOF
}
ok "restart" start
ok "checkpoint c1" ctl p checkpoint c1
pull p c1 "$tmp/c1.ref"
ok "a write that copies for c1" qio p "" "write -P 0x51 2M 64k"
crash
ok "corrupt the last record's checksum" last_record "$store"
ok "nbdkit starts" start
for s in a b c1; do
  is "$(snapinfo $s broken)" True "snapshot $s is broken: the lost record may be a copy"
done
reason=$(snapinfo c1 broken-reason)
diag "c1: $reason"
ok "the reason says the last record is damaged, not torn" grep -q "is damaged, not torn" <<<"$reason"
ok "nbdkit's log names c1" grep -q "snapshot 'c1' is broken" "$tmp/p.log"
ok_fails "c1's export fails reads with EIO" "Input/output error" qio p snapshot/c1 "read 0 64k"
is "$(jget "$(ctl p --json bitmap list)" '[b["inconsistent"] for b in d if b["name"] == "c1"][0]')" True \
  "the recording bitmap c1 is inconsistent: the record may have been a DIRTY one"
ok "nbdkit stops cleanly" stop_nbdkit p

# --- 5. what is formatted, and what is not ---
head -c 1M /dev/urandom >"$store"
refused "somebody else's file" "is not a Fleece store and not empty" persistent=true
refused "the same with persistent=false" "is not a Fleece store and not empty" persistent=false
: >"$store"
ok "an empty file is formatted" start
ok "snapshot create e" ctl p snapshot create e
ok "nbdkit stops cleanly" stop_nbdkit p
rm -f "$store"
truncate -s 64M "$store"
ok "a file of zeroes is formatted" start
is "$(jget "$(ctl p --json snapshot list)" 'len(d)')" 0 "with nothing in it"
ok "nbdkit stops cleanly" stop_nbdkit p
