#!/usr/bin/env bash
# Deleting a snapshot does not wait for its space to be punched out of
# the store file.  A punch can be slow (under heavy writes on ext4 it
# first writes back the range's dirty pages: one deletion took over 30 s
# with 8 writers), and it used to run on the control thread under
# admin_lock, so that the control socket, and a group's prepare on that
# disk, waited for it.  Frees of 64 MiB or more are now punched on a
# thread of its own (smaller ones are quick, and stay inline: on the
# thread they competed with group holds).  -D fleece.punch_delay_ms=3000
# makes each punch take 3 s.  The space counts as used until it is
# punched; a copy that finds store-max reached meanwhile waits for it
# instead of failing; a stop with punches queued gives everything back
# and exits cleanly; a small deletion is punched at once.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires nbdcopy --version
plan 24

disk=$tmp/disk store=$tmp/store
make_disk "$disk" 160M 0x21 || exit 1
ms () { echo $(( ${EPOCHREALTIME/./} / 1000 )); }
used () { jget "$(ctl p --json stats)" 'd["store-bytes-used"]'; }
broken () { jget "$(ctl p --json snapshot list)" \
                 '[s["broken"] for s in d if s["name"] == "'"$1"'"][0]'; }

ok "nbdkit starts, punches slowed to 3 s, store-max=64M" \
   start_nbdkit p -D fleece.punch_delay_ms=3000 -- disk="$disk" \
     store="$store" control="$tmp/p.ctl" store-max=64M
ok "snapshot s1" ctl p snapshot create s1
ok "64 MiB written: 1024 clusters copied, the store is full" \
   qio p "" "write -P 0x41 0 64M"
is "$(used)" 67108864 "the store holds 64 MiB"

t0=$(ms)
ok "snapshot delete s1" ctl p snapshot delete s1
t=$(( $(ms) - t0 ))
diag "snapshot delete took $t ms"
ok "it returned without waiting for the punch (< 1500 ms)" test "$t" -lt 1500
t0=$(ms)
ok "the control socket answers meanwhile" ctl p status
ok "at once (< 1000 ms)" test $(( $(ms) - t0 )) -lt 1000
is "$(used)" 67108864 "the space counts as used until it is punched"
gone () { [ "$(used)" = 0 ]; }
ok "the space is given back once punched" wait_for 30 gone

# store-max reached while freed runs are queued: the copies wait.
ok "snapshot s2, 64 MiB written, deleted" \
   eval 'ctl p snapshot create s2 && qio p "" "write -P 0x42 0 64M" &&
         ctl p snapshot delete s2'
ok "snapshot s3" ctl p snapshot create s3
t0=$(ms)
ok "64 MiB written at once" qio p "" "write -P 0x43 0 64M"
diag "the write waited $(( $(ms) - t0 )) ms for the space being punched"
is "$(broken s3)" False "s3 is not broken: its copies waited for room"
make_disk "$tmp/exp" 160M 0x21 160M "write -P 0x42 0 64M"
ok "s3 reads the disk as it was when s3 was created" \
   eval 'pull p s3 "$tmp/s3" && cmp "$tmp/s3" "$tmp/exp"'

ok "snapshot delete s3" ctl p snapshot delete s3
ok "its space is given back" wait_for 30 gone

# A deletion of less than 64 MiB is punched inline: the space is free
# when the delete returns.
ok "snapshot s4, 1 MiB written" \
   eval 'ctl p snapshot create s4 && qio p "" "write -P 0x44 100M 1M"'
is "$(used)" 1048576 "the store holds 1 MiB"
t0=$(ms)
ok "snapshot delete s4" ctl p snapshot delete s4
t=$(( $(ms) - t0 ))
ok "it punched inline ($t ms; a punch takes 3 s)" test "$t" -ge 2900
is "$(used)" 0 "the space is free when the delete returns"

ok "snapshot s5, 64 MiB written, deleted" \
   eval 'ctl p snapshot create s5 && qio p "" "write -P 0x45 0 64M" &&
         ctl p snapshot delete s5'
ok "nbdkit stops cleanly with a punch queued" stop_nbdkit p
