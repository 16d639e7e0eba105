#!/usr/bin/env bash
# fleece-colod: test-colod-group-failback.sh with the new primary of the
# group speaking protocol 2, as a fleece-colod from before group failback
# (HELLO max_version 2: one DIVERGED for the whole group).  The demoted
# old primary holds a diverged record per disk, which such a primary
# cannot take: the first epoch is a full copy of every disk, which the
# secondary's log explains, and the disks are equal after it.
export COLOD_FAILBACK_OLD_PRIMARY=1
exec bash "${abs_top_srcdir:-../..}/tests/colo/test-colod-group-failback.sh"
