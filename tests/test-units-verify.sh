#!/usr/bin/env bash
# The installed systemd units pass "systemd-analyze verify" (unknown keys,
# bad values, programs that are not there, man pages that are not
# installed: each is a failure here, not only a warning), and the
# sysusers.d file creates the user they run as.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires systemd-analyze --version
requires systemd-sysusers --version
requires make --version

root=$tmp/root
ok "make install DESTDIR=..." install_tree "$root"
install_dirs
units=$root$systemdsystemunitdir

# The units name the programs where they will be, $bindir; here they are
# under $root, so a copy of each unit names them there.  Each template is
# verified as an instance (vm1), as systemd would run it.
mkdir "$tmp/units"
for f in "$units"/fleece-*; do
  sed "s|=$bindir/|=$root$bindir/|" "$f" >"$tmp/units/${f##*/}"
done
n=$(ls "$tmp/units" | wc -l)
is "$n" 6 "six units are installed"
cd "$tmp/units" || exit 1
for f in fleece-*@.*; do
  ln -s "$f" "${f/@./@vm1.}"
done

for u in *@vm1.*; do
  st=0
  out=$(MANPATH="$root$mandir:" timeout -k 5 60 systemd-analyze verify "$u" 2>&1) ||
    st=$?
  [ -n "$out" ] && printf '# %s\n' "$out"
  ok "systemd-analyze verify $u: exit status 0 and nothing to say" \
     test "$st" = 0 -a -z "$out"
done

# Every ExecStart names a program that exists: verify checks this, and a
# unit that names one that is not there must fail here.
sed -i "s|=$root$bindir/fleece-colod |=$root$bindir/no-such-program |" \
  fleece-colod-secondary@.service
ok_fails "a unit naming a missing program fails verify" "not executable" \
  env MANPATH="$root$mandir:" timeout -k 5 60 \
    systemd-analyze verify fleece-colod-secondary@vm1.service

mkdir -p "$tmp/sysroot/etc"
ok "systemd-sysusers creates the services' user" \
   timeout -k 5 60 systemd-sysusers --root="$tmp/sysroot" \
     "$root$sysusersdir/fleece.conf"
ok "it is a system user named fleece with home /var/lib/fleece" \
   grep -q '^fleece:x:[0-9]*:[0-9]*:.*:/var/lib/fleece:' \
     "$tmp/sysroot/etc/passwd"
