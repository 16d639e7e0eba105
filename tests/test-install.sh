#!/usr/bin/env bash
# "make install" into a staging directory (DESTDIR) installs what the man
# pages promise: the programs, the plugin (without its libtool archive),
# the four man pages, and every docs/NAME.md that a man page cites, with
# README.md and LICENSE, into the documentation directory.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires make --version

b=$abs_top_builddir
s=$abs_top_srcdir
root=$tmp/root

ok "make install DESTDIR=..." install_tree "$root"

# Where each kind of file went, from the build's own settings.
install_dirs
plugindir=$nbdkit_plugindir
diag "prefix=$prefix docdir=$docdir plugindir=$plugindir"

for p in fleecectl fleece-backup fleece-colod; do
  ok "$p is installed" test -x "$root$bindir/$p"
done
ok "the plugin is installed" \
   test -f "$root$plugindir/nbdkit-fleece-plugin.so"
ok "its libtool archive is not" \
   test ! -e "$root$plugindir/nbdkit-fleece-plugin.la"
for m in nbdkit-fleece-plugin fleecectl fleece-backup fleece-colod; do
  ok "man page $m(1) is installed" test -s "$root$mandir/man1/$m.1"
done

# Every document a man page cites as F<docs/NAME>.
cited=$(grep -oh 'F<docs/[A-Za-z0-9_.-]*>' "$s"/plugin/*.pod "$s"/tools/*.pod \
          "$s"/tools/backup/*.pod "$s"/colo/*.pod |
          sed 's|^F<docs/||; s|>$||' | sort -u)
ok "the man pages cite documents" test -n "$cited"
for d in $cited; do
  ok "docs/$d, cited by a man page, is installed in the doc directory" \
     cmp "$s/docs/$d" "$root$docdir/$d"
done
for d in README.md LICENSE design.md; do
  ok "$d is installed in the doc directory" test -s "$root$docdir/$d"
done
for u in fleece-nbdkit@.service fleece-nbdkit@.socket \
         fleece-colod-primary@.service fleece-colod-secondary@.service \
         fleece-backup@.service fleece-backup@.timer; do
  ok "systemd unit $u is installed" test -s "$root$systemdsystemunitdir/$u"
done
ok "the services name the installed programs" \
   grep -q "^ExecStart=$bindir/fleece-colod primary " \
     "$root$systemdsystemunitdir/fleece-colod-primary@.service"
ok "the sysusers.d file of their user is installed" \
   grep -q '^u fleece ' "$root$sysusersdir/fleece.conf"
ok "the man pages say where the documents are" \
   grep -q 'share/doc/fleece' "$root$mandir/man1/nbdkit-fleece-plugin.1"

ok "make uninstall removes it all again" \
   timeout -k 5 300 env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL \
     make -C "$b" uninstall DESTDIR="$root"
left=$(find "$root" -type f | sed "s|^$root||")
is "$left" "" "nothing is left after uninstall"
