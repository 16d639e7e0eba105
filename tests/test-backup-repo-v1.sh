#!/usr/bin/env bash
# A repository of manifest version 1 still loads (issue 17 made the
# manifest version 2, for group points).  tests/backup-repo-v1.tar.xz was
# made by fleece-backup before that change (init, then backup --control
# of a 1 MiB disk twice: n1 full, n2 incremental; only the disk's path in
# the manifest was replaced by /srv/vm1/disk.img).  list, verify and
# restore read it as it is; prune, a writer, rewrites the manifest as
# version 2, after which every point still restores exactly.  Real
# clients: qemu-img, qemu-io.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-img --version
requires qemu-io --version

repo=$tmp/v1
mkdir "$repo"
ok "the fixture unpacks" tar -xJf "$abs_top_srcdir/tests/backup-repo-v1.tar.xz" -C "$repo"
is "$(jget "$(cat "$repo/manifest.json")" 'd["version"]')" 1 "its manifest is version 1"

# The disk at each point, as the fixture was made.
make_disk "$tmp/ref.n1" 1M 0x00 1M "write -P 0x5a 0 256k" "write -P 0x33 512k 64k"
cp "$tmp/ref.n1" "$tmp/ref.n2"
qemu-io -f raw -c "write -P 0x77 128k 64k" -c "write -z 512k 64k" \
  -c "write -P 0x44 960k 64k" "$tmp/ref.n2" >/dev/null

ok "list reads it" bash -c "fleece-backup list '$repo' >'$tmp/list'"
ok "... n1 full, n2 incremental" bash -c \
   "grep -q '^n1 .* full\$' '$tmp/list' && grep -q '^n2 *n1 .* incremental\$' '$tmp/list'"
ok "verify passes" fleece-backup verify "$repo"
for n in n1 n2; do
  ok "restore $n" fleece-backup restore "$repo" "$n" "$tmp/$n.img"
  ok "... exactly the disk at $n" cmp "$tmp/$n.img" "$tmp/ref.$n"
done
is "$(jget "$(cat "$repo/manifest.json")" 'd["version"]')" 1 "readers leave it version 1"

ok "prune --keep-last 1" fleece-backup prune "$repo" --keep-last 1
is "$(jget "$(cat "$repo/manifest.json")" 'd["version"]')" 2 "the writer rewrote the manifest as version 2"
ok "n2 restores exactly from the version 2 manifest" bash -c \
   "fleece-backup restore '$repo' n2 '$tmp/n2b.img' && cmp '$tmp/n2b.img' '$tmp/ref.n2'"
ok "verify passes" fleece-backup verify "$repo"
