#!/usr/bin/env bash
# The build tree as README.md and run.in tell users to use it: "./run
# nbdkit fleece disk=..." loads this tree's plugin by its short name,
# whatever nbdkit options come before or after it, and "./run fleecectl"
# and "./run fleece-backup" are this tree's tools.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires nbdkit --version
requires nbdinfo --version
plan 9

b=$abs_top_builddir
so="$b/plugin/.libs/nbdkit-fleece-plugin.so"
truncate -s 16M "$tmp/disk"

# ./run as a user calls it: a fresh environment's PATH, not the test's,
# and not under valgrind (see run.in).
run ()
{
  timeout -k 5 60 env -u FLEECE_VALGRIND -u VG \
    PATH="$(getconf PATH):/usr/local/bin" \
    "$b/run" "$@"
}

dump=$(run nbdkit fleece --dump-plugin 2>&1)
is "$(sed -n 's/^path=//p' <<<"$dump")" "$so" \
   "./run nbdkit fleece --dump-plugin loads the build tree's plugin"

size=$(run nbdkit -U - fleece disk="$tmp/disk" store="$tmp/store" \
         --run 'nbdinfo --size "$uri"' 2>&1)
is "$size" 16777216 "./run nbdkit -U - fleece disk=... --run serves the disk"

size=$(run nbdkit -D fleece.verbose=1 -fU - -t 4 --log stderr fleece \
         "$tmp/disk" store="$tmp/store" \
         --run 'nbdinfo --size "$uri"' 2>&1)
is "$size" 16777216 \
   "option values (-D, -fU -, --log stderr) are not taken for the plugin"

size=$(run nbdkit -U - --run 'nbdinfo --size "$uri"' -- \
         fleece "$tmp/disk" store="$tmp/store" 2>&1)
is "$size" 16777216 "the plugin after --"

ok "a plugin named by its path is passed on unchanged" \
   run nbdkit -U - "$so" disk="$tmp/disk" store="$tmp/store" \
     --run 'nbdinfo --size "$uri"'

ok "another short plugin name is nbdkit's own" \
   run sh -c 'nbdkit null --dump-plugin | grep -qx name=null'

is "$(run sh -c 'command -v fleecectl')" "$b/tools/fleecectl" \
   "./run fleecectl is the build tree's"
is "$(run sh -c 'command -v fleece-backup')" "$b/tools/fleece-backup" \
   "./run fleece-backup is the build tree's"
is "$(run sh -c 'command -v fleece-colod')" "$b/colo/fleece-colod" \
   "./run fleece-colod is the build tree's"
