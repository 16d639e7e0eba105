#!/usr/bin/env bash
# The engine's concurrency tests (isolation under racing writers,
# creation races, checkpoint atomicity under load) again, on a persistent
# store: copies then wait for group commits and admin operations write
# images, which must neither deadlock nor break an invariant.  Their TAP
# results are passed on, renumbered.  (The model tests of store layout,
# test-engine-cbw and test-engine-store, are not rerun: the image takes
# store slots, so their layout figures differ by design.)
source "${abs_top_srcdir:-..}/tests/functions.sh"

for t in test-engine-stress test-engine-create-race test-engine-bitmap; do
  out=$tmp/$t.out
  status=0
  # shellcheck disable=SC2086
  FLEECE_TEST_PERSISTENT=1 timeout 600 "$abs_top_builddir/libtool" \
    --mode=execute $VG "./$t" >"$out" 2>&1 || status=$?
  while IFS= read -r line; do
    case $line in
      "ok "*|"not ok "*)
        desc=${line#*ok [0-9]* }
        case $line in
          ok*) ok "$t (persistent): ${desc#- }" true ;;
          *) ok "$t (persistent): ${desc#- }" false ;;
        esac ;;
      "#"*) echo "$line" ;;
    esac
  done <"$out"
  is "$status" 0 "$t (persistent) exits 0"
done
