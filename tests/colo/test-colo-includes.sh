#!/usr/bin/env bash
# colo/'s files depend one way (colo/colod.h lists them): the graph of
# their #include "..." lines has no circle.  A node is one concept: x.c,
# x-*.c, x.h and x-internal.h together (tls.c, tls-creds.c and
# tls-handshake.c share tls-internal.h, which is no circle); an edge goes
# from a file to a header of colo/ it includes.  tsort finds the circle
# and names its files.  The checker is first shown a circle, so that it
# cannot pass by finding nothing.
source "${abs_top_srcdir:-../..}/tests/functions.sh"
requires tsort --version

colo=${abs_top_srcdir:-../..}/colo

# node FILE: the concept a file of colo/ belongs to.
node () { local b=${1##*/}; b=${b%%.*}; echo "${b%%-*}"; }

# include_graph DIR: "FROM TO" for every include of a header of DIR by a
# file of DIR between two concepts, and "X X" for every concept, so that
# one without includes is in the graph too.
include_graph ()
{
  local dir=$1 f h
  for f in "$dir"/*.c "$dir"/*.h; do
    [ -e "$f" ] || continue
    echo "$(node "$f") $(node "$f")"
    for h in $(sed -n 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*"\([^"]*\)".*/\1/p' "$f"); do
      [ -e "$dir/$h" ] || continue          # not colo/'s (include/, common/)
      [ "$(node "$f")" = "$(node "$h")" ] || echo "$(node "$f") $(node "$h")"
    done
  done
}

# no_circle DIR: fails, naming the files of the circle, if there is one.
no_circle ()
{
  local out
  if ! out=$(include_graph "$1" | tsort 2>&1 >/dev/null) || [ -n "$out" ]; then
    echo "include circle among the files of $1:"
    echo "$out"
    return 1
  fi
}

edges=$(include_graph "$colo" | awk '$1 != $2' | sort -u | wc -l)
nodes=$(include_graph "$colo" | awk '$1 == $2' | sort -u | wc -l)
diag "colo/: $nodes concepts, $edges dependencies between them"
ok "the graph covers colo/ (over 15 concepts, over 20 dependencies)" \
   test "$nodes" -gt 15 -a "$edges" -gt 20

mkdir "$tmp/circle"
printf '#include "b.h"\n' > "$tmp/circle/a.c"
printf '#include "c.h"\n' > "$tmp/circle/b.c"
printf '#include <stdio.h>\n#include "a.h"\n' > "$tmp/circle/c-internal.h"
touch "$tmp/circle/a.h" "$tmp/circle/b.h" "$tmp/circle/c.h"
ok_fails "a circle of three (a.c, b.c, c-internal.h) is found" \
   'contains a loop' no_circle "$tmp/circle"
names () { no_circle "$tmp/circle" | sed -n 's/^tsort: \([abc]\)$/\1/p' | sort | tr -d '\n'; }
is "$(names)" "abc" "and its files are named"
rm "$tmp/circle/c-internal.h"
ok "without its last include, it is gone" no_circle "$tmp/circle"

ok "no include circle among colo/'s files" no_circle "$colo"
