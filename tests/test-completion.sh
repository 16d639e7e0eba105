#!/usr/bin/env bash
# The installed bash completions (completion/, in bash-completion's
# completions directory): sourced into a bash with bash-completion, each
# function called as bash calls it on <TAB>, COMPREPLY checked.  The
# snapshot and bitmap names come from a running server's control socket.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires test -r /usr/share/bash-completion/bash_completion
requires make --version

root=$tmp/root
ok "make install DESTDIR=..." install_tree "$root"
install_dirs
dir=$root$bashcompletiondir

# compl WORD...: COMPREPLY, one a line, after <TAB> at the end of the
# words (the last one is the word being completed; bash splits at "=",
# so "--sync=" is given as "--sync" "=" "").
compl ()
{
  bash --norc --noprofile -c '
    source /usr/share/bash-completion/bash_completion
    source "$1/$2"
    shift
    COMP_WORDS=("$@")
    COMP_CWORD=$(( $# - 1 ))
    COMP_WORDBREAKS=$'"'"' \t\n"\x27><=;|&(:'"'"'
    COMP_LINE=$(printf "%s " "$@" | sed "s/ = /=/g; s/ \$//")
    COMP_POINT=${#COMP_LINE}
    f=$(complete -p "$1" | sed "s/.*-F \([^ ]*\) .*/\1/")
    "$f" "$1" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    printf "%s\n" "${COMPREPLY[@]}" | sort
  ' compl "$dir" "$@"
}
words () { compl "$@" | tr '\n' ' ' | sed 's/ $//'; }

for c in fleecectl fleece-backup fleece-colod; do
  ok "the completion of $c is installed" test -s "$dir/$c"
done

is "$(words fleecectl s)" "snapshot stats status" "fleecectl: commands"
is "$(words fleecectl m)" "metrics" "fleecectl: metrics"
is "$(words fleecectl -s x bitmap e)" "enable" "fleecectl: bitmap subcommands"
is "$(words fleecectl --j)" "--json" "fleecectl: options"

truncate -s 16M "$tmp/disk"
ok "nbdkit starts" start_nbdkit s -- disk="$tmp/disk" store="$tmp/store" \
   control="$tmp/s.ctl"
ok "snapshots 'nightly 1' and s2" sh -c \
   "fleecectl -s '$tmp/s.ctl' snapshot create 'nightly 1' &&
    fleecectl -s '$tmp/s.ctl' snapshot create s2"
ok "bitmaps b1 and b2" sh -c \
   "fleecectl -s '$tmp/s.ctl' bitmap add b1 &&
    fleecectl -s '$tmp/s.ctl' bitmap add b2"
is "$(words fleecectl -s "$tmp/s.ctl" snapshot delete '')" \
   'nightly\ 1 s2' "fleecectl: snapshot names from the socket (-s)"
is "$(words fleecectl --socket "$tmp/s.ctl" snapshot delete n)" \
   'nightly\ 1' "fleecectl: snapshot names starting with the word"
is "$(FLEECE_SOCKET=$tmp/s.ctl words fleecectl bitmap disable '')" \
   "b1 b2" "fleecectl: bitmap names from \$FLEECE_SOCKET"
is "$(words fleecectl -s "$tmp/s.ctl" bitmap merge b1 b)" \
   "b1 b2" "fleecectl: bitmap merge's sources"
is "$(words fleecectl -s "$tmp/nowhere.ctl" snapshot delete '')" "" \
   "fleecectl: no names, and no error, without a server"
ok "nbdkit stops" stop_nbdkit s

is "$(words fleece-backup --sync = '')" "full incremental top" \
   "fleece-backup: --sync= values"
is "$(words fleece-backup --on-error = r)" "report retry" \
   "fleece-backup: --on-error= values"
is "$(words fleece-backup --disc)" "--discard-source" \
   "fleece-backup: options from its --help"
is "$(words fleece-colod p)" "primary promote" "fleece-colod: subcommands"
is "$(words fleece-colod m)" "metrics" "fleece-colod: metrics"
is "$(words fleece-colod primary --log '')" "journal stderr syslog" \
   "fleece-colod: --log values"
is "$(words fleece-colod primary --tls-c)" "--tls-certificates" \
   "fleece-colod: options from its --help"
mkdir "$tmp/pki-dir"
is "$(cd "$tmp" && words fleece-colod secondary --tls-certificates pki)" \
   "pki-dir" "fleece-colod: a directory for --tls-certificates"
