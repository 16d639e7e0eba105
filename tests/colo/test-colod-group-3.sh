#!/usr/bin/env bash
# fleece-colod: test-colod-group.sh with a group of three disks, in 7
# rounds (kills of the secondary in 6 of them, of the primary host in
# the last) so that it lasts about as long as the run with two.
export COLOD_GROUP_DISKS=3 COLOD_GROUP_ROUNDS=7
exec bash "${abs_top_srcdir:-../..}/tests/colo/test-colod-group.sh"
