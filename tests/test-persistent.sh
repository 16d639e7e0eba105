#!/usr/bin/env bash
# persistent=true (docs/durability.md): snapshots, their data, bitmaps and
# checkpoints survive a clean restart and a kill -9; a bitmap that was
# recording at a kill -9 holds every write acknowledged before it (DIRTY
# records); the store refuses another disk, another cluster size, and
# damage; persistent=false refuses to wipe it.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires nbdcopy --version
requires python3 --version

persistent_setup
state () { jget "$(ctl p --json bitmap list)" "[('inconsistent' if b['inconsistent'] else 'frozen' if b['frozen'] else 'recording' if b['enabled'] else 'disabled') for b in d if b['name'] == '$1'][0]"; }
bits () { bitmap_bits "nbd+unix:///bitmap/$1?socket=$tmp/p.sock" | tr '\n' ' '; }
broken () { jget "$(ctl p --json snapshot list)" "[s['broken'] for s in d if s['name'] == '$1'][0]"; }

# --- 3 snapshots, 2 bitmaps, a clean restart ---
ok "nbdkit starts persistent on a new store" start
ok "checkpoint c1" ctl p checkpoint c1
pull p c1 "$tmp/c1.ref"
ok "write 1" qio p "" "write -P 0x31 0 256k" "write -P 0x32 3M 64k"
ok "snapshot create s2" ctl p snapshot create s2
pull p s2 "$tmp/s2.ref"
ok "write 2" qio p "" "write -P 0x41 128k 256k" "write -z 5M 128k"
ok "checkpoint c3" ctl p checkpoint c3
pull p c3 "$tmp/c3.ref"
ok "write 3" qio p "" "write -P 0x51 7M 64k"
ok "bitmap add d (disabled)" ctl p bitmap add d --disabled
ok "snapshot s2 trimmed (released) in its first MiB" qio p snapshot/s2 "discard 0 1M"
c1_bits=$(bits c1); c3_bits=$(bits c3)
diag "c1: $c1_bits / c3: $c3_bits"
is "$c1_bits" "0 1 2 3 4 5 48 80 81 " "c1 froze with the clusters written between c1 and c3"
is "$c3_bits" "112 " "c3 records what was written since"
live=$(sum "$disk")
ok "nbdkit stops cleanly" stop_nbdkit p
ok "nbdkit restarts on the same store" start
is "$(jget "$(ctl p --json snapshot list)" '[s["name"] for s in d]')" "['c1', 's2', 'c3']" "3 snapshots back, in order"
for s in c1 c3; do
  ok "pull $s" pull p $s "$tmp/$s.img"
  is "$(sum "$tmp/$s.img")" "$(sum "$tmp/$s.ref")" "snapshot $s: same sha256 as before the restart"
done
ok "pull s2" pull p s2 "$tmp/s2.img"
ok "s2 reads zeroes where it was released" cmp -n 1048576 "$tmp/s2.img" /dev/zero
ok "s2 equals its reference after the first MiB" cmp -i 1048576 "$tmp/s2.img" "$tmp/s2.ref"
is "$(jget "$(ctl p --json snapshot list)" 'd[1]["clusters-released"]')" 16 "s2 still has 16 released clusters"
is "$(bits c1)" "$c1_bits" "bitmap c1: same bits"
is "$(bits c3)" "$c3_bits" "bitmap c3: same bits"
is "$(state c1)/$(state c3)/$(state d)" "frozen/recording/disabled" "bitmap states kept"
is "$(jget "$(ctl p --json bitmap list)" '[b["frozen-by"] for b in d if b["name"] == "c1"][0]')" c3 "c1 still frozen by c3"
is "$(sum "$disk")" "$live" "live disk unchanged by the restart"

# --- kill -9 ---
ok "write 4" qio p "" "write -P 0x61 6M 64k"
ok "checkpoint c4 (freezes c3)" ctl p checkpoint c4
pull p c4 "$tmp/c4.ref"
ok "write 5" qio p "" "write -P 0x71 2M 128k"
c3_bits=$(bits c3)
crash
ok "nbdkit restarts after kill -9" start
for s in c1 c3 c4; do
  ok "pull $s after the crash" pull p $s "$tmp/$s.img"
  is "$(sum "$tmp/$s.img")" "$(sum "$tmp/$s.ref")" "snapshot $s: exact after kill -9"
done
is "$(state c3)" frozen "frozen bitmap c3 is trusted after kill -9"
is "$(bits c3)" "$c3_bits" "and has its bits"
is "$(state c4)" recording "recording bitmap c4 is still recording and consistent after kill -9"
is "$(bits c4)" "32 33 " "c4 has the write made just before the crash (its DIRTY record)"
is "$(state d)" disabled "a disabled bitmap is trusted after kill -9"
ok "write 6, many clusters, then kill -9 at once" qio p "" "write -P 0x72 4M 1M"
crash
ok "restart" start
is "$(bits c4)" "$(seq -s ' ' 32 33) $(seq -s ' ' 64 79) " "c4 has every cluster of write 6"
ok "nbdkit stops cleanly" stop_nbdkit p
ok "restart" start
is "$(state c4)" recording "still consistent after a clean restart"
ok "snapshot delete c1" ctl p snapshot delete c1
ok "snapshot delete s2" ctl p snapshot delete s2
ok "bitmap remove d" ctl p bitmap remove d
crash
ok "restart after kill -9" start
is "$(jget "$(ctl p --json snapshot list)" '[s["name"] for s in d]')" "['c3', 'c4']" "deleted snapshots stay deleted"
is "$(jget "$(ctl p --json bitmap list)" 'sorted(b["name"] for b in d)')" "['c1', 'c3', 'c4']" "removed bitmap stays removed"
ok "pull c3" pull p c3 "$tmp/c3.img"
is "$(sum "$tmp/c3.img")" "$(sum "$tmp/c3.ref")" "c3 exact"
live=$(sum "$disk")
ok "nbdkit stops cleanly" stop_nbdkit p

# --- what the store refuses ---
nbd () { nbdkit_once -f -U "$tmp/x.sock" "$FLEECE_PLUGIN" "$@"; }
cp "$disk" "$tmp/copy"
ok_fails "a store of another disk (a copy of it)" "belongs to another disk than .*identity" \
  nbd disk="$tmp/copy" store="$store" persistent=true
truncate -s 16M "$tmp/big"
ok_fails "a store of a disk of another size" "belongs to a disk of 8388608 bytes" \
  nbd disk="$tmp/big" store="$store" persistent=true
ok_fails "another cluster size" "was made with cluster-size=65536, not 131072" \
  nbd disk="$disk" store="$store" persistent=true cluster-size=128K
ok_fails "persistent=false does not wipe it" "holds the persistent snapshots.*start with persistent=true" \
  nbd disk="$disk" store="$store"
cp "$store" "$tmp/store.good"
python3 - "$store" <<'EOF'
import sys
f = open(sys.argv[1], "r+b")
f.seek(40); b = f.read(1); f.seek(40); f.write(bytes([b[0] ^ 1]))
EOF
ok_fails "a damaged superblock" "superblock checksum is wrong" \
  nbd disk="$disk" store="$store" persistent=true
# Damage both halves' STATE records: nothing says what the state is.
cp "$tmp/store.good" "$store"
python3 - "$store" <<'EOF'
import sys
f = open(sys.argv[1], "r+b")
for off in (4096 + 40, 4096 + 2 * 1024 * 1024 + 40):
    f.seek(off); b = f.read(1); f.seek(off); f.write(bytes([b[0] ^ 0x80]))
EOF
ok_fails "a damaged log" "neither half of the metadata log starts with a valid STATE record" \
  nbd disk="$disk" store="$store" persistent=true
cp "$tmp/store.good" "$store"
is "$(sum "$disk")" "$live" "refused starts left the disk alone"
ok "the good store still loads" start
is "$(jget "$(ctl p --json snapshot list)" '[s["name"] for s in d]')" "['c3', 'c4']" "with its snapshots"
ok "nbdkit stops cleanly" stop_nbdkit p

# --- the log's tail: torn (a batch that never completed) or damaged ---
# log_edit STORE torn|damage: find the active half (the valid STATE record
# with the higher sequence), walk its records; "torn" writes what a crash
# leaves of a record after the last one: the next sequence and a length
# that reaches past the sector (512 bytes) where it starts, its bytes up
# to the end of that sector written and the next sectors not (zero, as
# everything past the end of the log is); "damage" flips a payload byte
# of the first record after the STATE.
log_edit ()
{
  python3 - "$@" <<'EOF2'
import struct, sys
path, what = sys.argv[1], sys.argv[2]
f = open(path, "r+b")
HALF = 2 * 1024 * 1024
def records(base):
    f.seek(base); d = f.read(HALF); pos = 0; out = []
    while pos + 32 <= HALF and d[pos:pos+4] == b"FLMR":
        typ, flags, ln, res, seq = struct.unpack_from("<HHIIQ", d, pos + 4)
        out.append((pos, typ, ln, seq))
        pos += 32 + ((ln + 7) & ~7)
    return out, pos
halves = [records(4096 + h * HALF) for h in (0, 1)]
act = max((0, 1), key=lambda h: halves[h][0][0][3] if halves[h][0] and halves[h][0][0][1] == 1 else -1)
recs, end = halves[act]
base = 4096 + act * HALF
print("records after STATE:", len(recs) - 1)
if what == "torn":
    last = recs[-1]
    hdr = b"FLMR" + struct.pack("<HHIIQQ", 0x20, 0, 8 + 16 * 80, 0, last[3] + 1, 12345)
    written = (end // 512 + 1) * 512 - end
    body = (hdr + b"\x01" * 2000)[:max(written, 32)]
    f.seek(base + end); f.write(body)
else:
    pos = recs[1][0] + 32 + 9
    f.seek(base + pos); b = f.read(1); f.seek(base + pos); f.write(bytes([b[0] ^ 0x40]))
EOF2
}
ok "restart" start
ok "snapshot create t" ctl p snapshot create t
pull p t "$tmp/t.ref"
ok "writes that copy" qio p "" "write -P 0x81 0 64k" "write -P 0x82 1M 64k" "write -P 0x83 4M 64k"
crash
ok "a torn record after the last one" log_edit "$store" torn
ok "restart after a torn tail" start
ok "pull t" pull p t "$tmp/t.img"
is "$(sum "$tmp/t.img")" "$(sum "$tmp/t.ref")" "t exact: the torn tail was ignored"
is "$(broken t)" False "t not broken"
ok "more writes that copy" qio p "" "write -P 0x91 2M 64k" "write -P 0x92 5M 64k"
crash
ok "a damaged record followed by valid ones" log_edit "$store" damage
ok "restart after damage" start
is "$(broken t)" True "t is broken: copies may be missing"
reason=$(jget "$(ctl p --json snapshot list)" '[s["broken-reason"] for s in d if s["name"] == "t"][0]')
diag "reason: $reason"
ok "the reason names the damaged record" grep -q "has a damaged record" <<<"$reason"
is "$(state c4)" inconsistent "the recording bitmap c4 is inconsistent: a DIRTY record may be missing"
ok "bitmap clear c4 makes it consistent again" ctl p bitmap clear c4
is "$(state c4)" recording "c4 recording again"
ok_fails "t's export fails reads" "Input/output error" qio p snapshot/t "read 0 64k"
ok "live writes go on while t is broken by damage (no record to wait for)" \
   timeout 30 qemu-io -f raw "$(live_uri p)" -c "write -P 0x93 6M 64k"
ok "snapshot delete t" ctl p snapshot delete t
ok "nbdkit stops cleanly" stop_nbdkit p

# --- an nbdkit that stops before its first write leaves nothing to distrust ---
ok "restart" start
ok "nbdkit stops cleanly" stop_nbdkit p
ok "restart" start
crash
ok "restart after a kill -9 that came before any write" start
is "$(state c4)" recording "c4 still recording"
ok "nbdkit stops cleanly" stop_nbdkit p

# --- persistent=false: nothing survives, the store is formatted afresh ---
start_np () { start_nbdkit n -- disk="$disk" store="$tmp/np-store" control="$tmp/n.ctl"; }
ok "start persistent=false" start_np
ok "snapshot create gone" ctl n snapshot create gone
ok "checkpoint gone-cp" ctl n checkpoint gone-cp
ok "nbdkit stops cleanly" stop_nbdkit n
ok "restart persistent=false" start_np
is "$(jget "$(ctl n --json snapshot list)" 'len(d)')/$(jget "$(ctl n --json bitmap list)" 'len(d)')" "0/0" "no snapshot, no bitmap survived"
ok "nbdkit stops cleanly" stop_nbdkit n
