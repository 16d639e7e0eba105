#!/usr/bin/env bash
# Consistency groups keep causality across disks (issue 17): group-writer
# makes dependent writes round robin over 2, then 4 disks, each served by
# its own nbdkit, a write issued only once the one before it (on another
# disk) was acknowledged.  20 groups taken at random moments with
# `fleecectl -s D1 -s D2 ... snapshot create` must each hold a prefix of
# the writes.  The same writer with one snapshot per disk, taken one
# after the other, must show a write without one it depended on at
# least once in 20: that is what the group prevents, and it makes this
# test able to fail.  Real clients: group-writer and the checker (libnbd
# on the snapshot exports), fleecectl.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version

gw=$abs_top_builddir/tests/group-writer
ROUNDS=20

# scenario N: N servers, the writer, 20 groups then 20 single rounds.
scenario ()
{
  local n=$1 i d r socks=() uris total prefix=0 violations=0 wpid
  for (( d = 0; d < n; d++ )); do
    make_disk "$tmp/disk$n.$d" 1M
    start_nbdkit "d$n.$d" -- disk="$tmp/disk$n.$d" store="$tmp/store$n.$d" \
                 control="$tmp/d$n.$d.ctl" cluster-size=64K || return 1
    socks+=(-s "$tmp/d$n.$d.ctl")
  done
  uris=()
  for (( d = 0; d < n; d++ )); do uris+=("$(live_uri "d$n.$d")"); done
  "$gw" write 120 "${uris[@]}" >"$tmp/writer$n.out" 2>&1 &
  wpid=$!
  cleanup_fn "kill $wpid 2>/dev/null"
  sleep 0.2
  for (( r = 1; r <= ROUNDS; r++ )); do
    sleep "0.0$(( RANDOM % 10 ))"
    fleecectl "${socks[@]}" snapshot create "g$r" >"$tmp/g.out" 2>&1 ||
      { cat "$tmp/g.out"; return 1; }
  done
  for (( r = 1; r <= ROUNDS; r++ )); do
    sleep "0.0$(( RANDOM % 10 ))"
    for (( d = 0; d < n; d++ )); do
      fleecectl -s "$tmp/d$n.$d.ctl" snapshot create "v$r" >/dev/null ||
        return 1
      sleep 0.01
    done
  done
  kill "$wpid"
  wait "$wpid" || { cat "$tmp/writer$n.out"; return 1; }
  total=$(cat "$tmp/writer$n.out")
  diag "$n disks: the writer made $total writes"
  for (( r = 1; r <= ROUNDS; r++ )); do
    uris=()
    for (( d = 0; d < n; d++ )); do uris+=("$(snap_uri "d$n.$d" "g$r")"); done
    if "$gw" check "${uris[@]}" >"$tmp/check.out"; then
      prefix=$(( prefix + 1 ))
      cut -d' ' -f1 "$tmp/check.out" >>"$tmp/cuts$n"
    else
      diag "group g$r: $(cat "$tmp/check.out")"
    fi
    uris=()
    for (( d = 0; d < n; d++ )); do uris+=("$(snap_uri "d$n.$d" "v$r")"); done
    "$gw" check "${uris[@]}" >"$tmp/check.out"
    case $? in
      0) ;;
      1) violations=$(( violations + 1 )) ;;
      *) return 1 ;;
    esac
  done
  diag "$n disks, one snapshot per disk: $violations of $ROUNDS broke causality, e.g. $(cat "$tmp/check.out")"
  is "$prefix" "$ROUNDS" "$n disks: every group of snapshots holds a prefix of the writes"
  ok "$n disks: one snapshot per disk, one after the other, breaks causality ($violations of $ROUNDS)" \
     test "$violations" -ge 1
  ok "$n disks: the writer made progress ($total writes)" test "$total" -gt $(( 4 * ROUNDS ))
  ok "$n disks: the groups caught the writer at $(sort -u "$tmp/cuts$n" | wc -l) different points" \
     test "$(sort -u "$tmp/cuts$n" | wc -l)" -ge $(( ROUNDS / 2 ))
  for (( d = 0; d < n; d++ )); do
    ok "nbdkit d$n.$d stops cleanly" stop_nbdkit "d$n.$d"
  done
}

scenario 2
scenario 4
