#!/usr/bin/env bash
# The source tree stands on its own: no file names a path of one machine
# or a document that is not in the tree, every invariant the code cites
# by number is one of docs/design.md, and every relative link of the
# Markdown documents and every docs/ file a man page cites exists; a C
# file over 1000 lines says at its top why.
source "${abs_top_srcdir:-..}/tests/functions.sh"
s=$abs_top_srcdir

# The files people write (not what autoreconf, configure or make make).
sources=$tmp/sources
(cd "$s" && find . \( -name .git -o -name build-aux -o -name autom4te.cache \
                   -o -name .libs -o -name .deps -o -name 'fuzz-work' \
                   -o -name '*-corpus' -o -path './_build*' \) -prune \
       -o -type f \
       \( -name '*.[ch]' -o -name '*.sh' -o -name '*.md' -o -name '*.pod' \
          -o -name '*.py' -o -name '*.am' -o -name '*.ac' -o -name '*.in' \
          -o -name HACKING -o -name install-deps -o -path ./.ci/run \) \
       ! -name Makefile.in ! -name config.h.in -print | sort) >"$sources"
ok "the tree has sources" test -s "$sources"

# Paths of one machine (a home or work directory of the session that
# wrote it) and documents that live outside the tree.
hits=$(cd "$s" && xargs grep -nE '/work/|/root/|DESIGN\.md|STYLE\.md' \
         <"$sources" | grep -v '^./tests/test-self-contained.sh:')
is "$hits" "" "no file names /work/, /root/, DESIGN.md or STYLE.md"

# No C file over 1000 lines without the reason at its top (docs/HACKING:
# a paragraph "Size." in the file's opening comment).
long=$(cd "$s" && grep '\.c$' "$sources" | while read -r f; do
         n=$(wc -l <"$f")
         if [ "$n" -gt 1000 ] && ! sed -n '1,/^ \*\//p' "$f" | grep -q '^ \* Size\. '; then
           echo "$f ($n lines)"
         fi
       done)
is "$long" "" "every C file over 1000 lines says at its top why (Size.)"

design=$s/docs/design.md
ok "docs/design.md exists" test -s "$design"
defined=$(sed -n '/^## Invariants/,/^## /p' "$design" 2>/dev/null |
            sed -n 's/^\([0-9][0-9]*\)\. \*\*.*/\1/p' | sort -n | tr '\n' ' ')
ok "docs/design.md numbers its invariants" test -n "$defined"
cited=$(cd "$s" && xargs grep -ohiE \
          'invariants? [0-9]+((, | and | or )[0-9]+)*' <"$sources" |
          grep -oE '[0-9]+' | sort -nu | tr '\n' ' ')
diag "invariants cited: $cited; defined: $defined"
missing=
for n in $cited; do
  case " $defined " in *" $n "*) ;; *) missing="$missing $n" ;; esac
done
is "$missing" "" "every invariant cited by number is defined in docs/design.md"

# Relative links in the Markdown documents ([text](path) and
# [text](path#anchor)), resolved from each document's directory.
broken=
while read -r f; do
  d=$(dirname "$s/$f")
  for l in $(grep -oE '\]\([^)#: ]+[)#]' "$s/$f" | sed 's/^](//; s/.$//'); do
    [ -e "$d/$l" ] || broken="$broken $f:$l"
  done
done < <(grep '\.md$' "$sources")
is "$broken" "" "every relative link of the Markdown documents exists"

broken=
for l in $(cd "$s" && grep -ohE 'F<docs/[A-Za-z0-9_.-]+>' \
             plugin/*.pod tools/*.pod tools/backup/*.pod colo/*.pod |
             sed 's/^F<//; s/>$//'); do
  [ -e "$s/$l" ] || broken="$broken $l"
done
is "$broken" "" "every docs/ file the man pages cite exists"
