#!/usr/bin/env bash
# A group backup as it runs between hosts (issue 17): two disks, each
# served by its own nbdkit with --tls=require (X.509), pulled over TLS,
# every checkpoint made through `--control ssh://HOST/PATH' (sshd on
# 127.0.0.1: fleecectl relay on the far side), into a compressed group
# repository, then an encrypted one (qcow2 LUKS).  Each night's post-hook
# copies both snapshots of the group's instant over TLS: the reference.
# Every group point restores to its references, the files are
# compressed or encrypted as asked, the servers are left tidy (no
# snapshot, one bitmap per disk: the last night's), an encrypted group
# point needs its key, and a group backup whose second control socket is
# not there over ssh creates nothing on the first server.  The servers
# drop a control connection idle for 1.5 s (-D fleece.ctl_idle_timeout_ms;
# 10 s before a first request and 60 s after one by default), and one
# night's pre-hook takes 2 s: no connection may wait through it.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires_repo
requires_sshd
make_pki

start_sshd
ok "sshd listens on 127.0.0.1:$sshd_port" wait_for 10 \
   "$tmp/ssh" 127.0.0.1 true
fleecectl_path=$(command -v fleecectl)
control () { echo "ssh://127.0.0.1/$tmp/$1.ctl?fleecectl=$fleecectl_path"; }

DISKS="a b"
for d in $DISKS; do
  make_disk "$tmp/disk.$d" 8M "0x1$d" 2M
  ok "nbdkit $d starts (--tls=require)" \
     start_nbdkit "$d" --tls=require --tls-certificates="$tmp/pki" \
     -D fleece.ctl_idle_timeout_ms=1500 -- disk="$tmp/disk.$d" store="$tmp/$d.store" control="$tmp/$d.ctl" \
     cluster-size=64K
done

# The post-hook: both snapshots of the group, over TLS.
cat >"$tmp/refs.sh" <<'HOOK'
#!/bin/sh
[ "$FLEECE_GROUP_RESULT" = created ] || exit 0
for d in a b; do
  nbdcopy "nbds+unix:///snapshot/$FLEECE_GROUP_NAME?socket=$T/$d.sock&tls-certificates=$T/pki" \
    "$T/ref.$FLEECE_GROUP_NAME.$d" || exit 1
done
HOOK
chmod +x "$tmp/refs.sh"
export T=$tmp

# gbackup REPO NAME [options]: one group backup of a and b, remote style.
gbackup ()
{
  local r=$1 n=$2 d args=(); shift 2
  for d in $DISKS; do
    args+=("$d=$(x509_uri "$d" "")" --control "$(control "$d")")
  done
  fleece-backup backup "$r" "${args[@]}" --name "$n" \
    --post-hook "$tmp/refs.sh" "$@" 2>"$tmp/$n.err" ||
    { cat "$tmp/$n.err"; return 1; }
}
# exact REPO NAME [options]: the group point restores to its references.
exact ()
{
  local r=$1 n=$2 d; shift 2
  rm -rf "$tmp/rs" && mkdir "$tmp/rs" &&
  fleece-backup restore "$r" "$n" "$tmp/rs" -q "$@" || return 1
  for d in $DISKS; do cmp "$tmp/rs/$d" "$tmp/ref.$n.$d" || return 1; done
}
# tidy NAME: no snapshot left on either server, and only bitmap NAME.
tidy ()
{
  local d
  for d in $DISKS; do
    [ "$(ctl "$d" --json snapshot list)" = "[]" ] &&
    [ "$(jget "$(ctl "$d" --json bitmap list)" '" ".join(b["name"] for b in d)')" = "$1" ] ||
      { echo "server $d: $(ctl "$d" snapshot list) / $(ctl "$d" bitmap list)"; return 1; }
  done
}
# nothing_made REPO NAME PREVIOUS: no point NAME in REPO, and the servers
# as PREVIOUS left them.
nothing_made ()
{
  ! fleece-backup list "$1" | grep -q "^$2 " && tidy "$3"
}
writes ()
{
  qio_x509 a "" -- "write -P $1 $(( $1 * 64 ))k 192k" >/dev/null &&
  qio_x509 b "" -- "write -P $(( $1 + 1 )) 5M 64k" "write -z 1M 64k" >/dev/null
}

# --- compressed ---
z=$tmp/z
ok "init (compressed group)" fleece-backup init "$z"
ok "night z1: group backup over ssh and TLS, --compress" gbackup "$z" z1 --compress
is "$(grep -c 'sync=full' "$tmp/z1.err")" 2 "z1: both disks full"
ok "servers tidy after z1" tidy z1
ok "writes" writes 0x21
ok "night z2: incremental, --compress, a pre-hook longer than the idle limit" \
   gbackup "$z" z2 --compress --pre-hook "sleep 2"
is "$(grep -c 'sync=incremental.* point=z2 parent=z1' "$tmp/z2.err")" 2 \
   "z2: both disks incremental on z1"
ok "servers tidy after z2" tidy z2
for n in z1 z2; do
  ok "$n restores to the snapshots of its instant" exact "$z" "$n"
  for d in $DISKS; do
    check=$(qemu-img check --output=json -f qcow2 "$z/disks/$d/$n.qcow2")
    ok "$n: disk $d's file holds compressed clusters" \
       test "$(jget "$check" 'd.get("compressed-clusters", 0)')" -gt 0
  done
done
ok "verify" fleece-backup verify "$z"

# --- encrypted ---
key=$tmp/key
head -c 32 /dev/urandom | base64 >"$key"
head -c 32 /dev/urandom | base64 >"$tmp/wrong"
e=$tmp/e
ok "init (encrypted group)" fleece-backup init "$e"
ok "writes" writes 0x31
ok "night e1: group backup over ssh and TLS, --encrypt-key-file" \
   gbackup "$e" e1 --encrypt-key-file "$key"
ok "writes" writes 0x41
ok_fails "night e2 without the key is refused" \
   "e1 of .* is encrypted: .*give --encrypt-key-file" gbackup "$e" e2
ok "... before anything was made: no point, servers as they were" \
   nothing_made "$e" e2 e1
ok_fails "... and with a wrong key" "does not open it" \
   gbackup "$e" e2 --encrypt-key-file "$tmp/wrong"
ok "... before anything was made" nothing_made "$e" e2 e1
ok "night e2 with the key" gbackup "$e" e2 --encrypt-key-file "$key"
is "$(grep -c 'sync=incremental.* point=e2 parent=e1' "$tmp/e2.err")" 2 \
   "e2: both disks incremental on e1"
ok "servers tidy after e2" tidy e2
for d in $DISKS; do
  is "$(jget "$(qemu-img info --output=json "$e/disks/$d/e2.qcow2")" 'd["encrypted"]')" \
     True "e2: disk $d's file is encrypted"
done
mkdir "$tmp/nokey"
ok_fails "restore without the key is refused" "encrypted: give its key" \
   fleece-backup restore "$e" e2 "$tmp/nokey"
for n in e1 e2; do
  ok "$n restores with the key to the snapshots of its instant" \
     exact "$e" "$n" --encrypt-key-file "$key"
done
ok "verify with the key" fleece-backup verify "$e" --encrypt-key-file "$key"

# --- a control socket that is not there, over ssh ---
ok_fails "a group whose second control socket is missing fails" \
   "nope.ctl" \
   fleece-backup backup "$z" "a=$(x509_uri a "")" --control "$(control a)" \
   "b=$(x509_uri b "")" --control "$(control nope)" --name z3
ok "... and leaves server a as it was" tidy e2
ok "sshd saw the key log in" grep -q "Accepted publickey" "$tmp/sshd.log"
for d in $DISKS; do ok "nbdkit $d stops cleanly" stop_nbdkit "$d"; done
ok "sshd stops" kill_by_pidfile "$tmp/sshd.tpid"
