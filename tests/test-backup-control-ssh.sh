#!/usr/bin/env bash
# fleece-backup backup --control ssh://HOST/PATH, with the snapshot pulled
# over TLS (X.509): the cycle reaches the control socket through ssh,
# which runs "fleecectl -s PATH relay" on the host (no new listener).
# sshd runs on 127.0.0.1 for the test, with a throwaway host key and user
# key; the client uses them through $FLEECE_BACKUP_SSH (a wrapper that
# gives ssh the test's configuration).  Three nights, one of them killed
# after its checkpoint: every point exact, the server tidy.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-img --version
requires qemu-nbd --version
requires nbdcopy --version
requires_sshd
requires fleece-backup --help
make_pki

# --- sshd on 127.0.0.1 ---
start_sshd
ok "sshd listens on 127.0.0.1:$sshd_port" wait_for 10 \
   "$tmp/ssh" 127.0.0.1 true

# --- the server, TLS only for its snapshots ---
disk=$tmp/disk
make_disk "$disk" 16M 0x01 4M
ok "nbdkit starts (--tls=require)" \
   start_nbdkit s --tls=require --tls-certificates="$tmp/pki" \
   -- disk="$disk" store="$tmp/store" control="$tmp/s.ctl" cluster-size=64K
repo=$tmp/repo
ok "init" fleece-backup init "$repo"
fleecectl_path=$(command -v fleecectl)
control="ssh://127.0.0.1/$tmp/s.ctl?fleecectl=$fleecectl_path"
source_uri=$(x509_uri s "")

night ()
{
  local n=$1 step=${2:-} st=0
  ctl s snapshot create "ref$n" >/dev/null &&
  nbdcopy "$(x509_uri s "snapshot/ref$n")" "$tmp/ref$n" &&
  ctl s snapshot delete "ref$n" >/dev/null || return 1
  if [ -n "$step" ]; then
    FLEECE_BACKUP_CRASH_AT=$step fleece-backup backup "$repo" \
      "$source_uri" --control "$control" --name "n$n" 2>/dev/null || st=$?
    [ "$st" -eq 137 ] || { echo "not killed at $step: status $st"; return 1; }
  fi
  fleece-backup backup "$repo" "$source_uri" --control "$control" \
    --name "n$n" 2>"$tmp/night$n.err" || { cat "$tmp/night$n.err"; return 1; }
  cat "$tmp/night$n.err"
}
exact ()
{
  qemu-img convert -f qcow2 -O raw "$repo/n$1.qcow2" "$tmp/img" &&
  [ "$(sum "$tmp/img")" = "$(sum "$tmp/ref$1")" ]
}
tidy ()
{
  [ "$(ctl s --json snapshot list)" = "[]" ] &&
  [ "$(jget "$(ctl s --json bitmap list)" '" ".join(b["name"] for b in d)')" = "n$1" ]
}

ok "night 1 over ssh (full)" night 1
ok "n1 exact" exact 1
ok "server tidy" tidy 1
ok "writes" qio_x509 s "" -- "write -P 0x22 1M 200k" "write -z 3M 64k"
ok "night 2 over ssh, killed after its checkpoint, then again" \
   night 2 control-checkpointed
ok "night 2 finished the interrupted checkpoint" \
   grep -q "finishing checkpoint n2" "$tmp/night2.err"
ok "n2 exact" exact 2
ok "server tidy" tidy 2
ok "writes" qio_x509 s "" -- "write -P 0x33 9M 100k"
ok "night 3 over ssh (incremental)" night 3
ok "night 3 is incremental on n2" grep -q "sync=incremental.*point=n3 parent=n2" \
   "$tmp/night3.err"
ok "n3 exact" exact 3
ok "server tidy" tidy 3
ok "sshd saw the key log in" grep -q "Accepted publickey" "$tmp/sshd.log"
ok_fails "a control socket that is not there, over ssh" \
   "control socket.*(No such file|connect)" \
   fleece-backup backup "$repo" "$source_uri" --name n4 \
   --control "ssh://127.0.0.1/$tmp/nope.ctl?fleecectl=$fleecectl_path"
ok "sshd stops" kill_by_pidfile "$tmp/sshd.tpid"
