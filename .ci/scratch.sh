# Sourced by the CI scripts that build in a scratch copy of the working tree
# (sanitize.sh, portable.sh, cuda_emulation.sh), so the checkout's own build is left alone.

# scratch_dir DIR PREFIX: sets WORK to DIR when given (kept afterwards: KEEP=1), else to a
# fresh mktemp -d named PREFIX.XXXXXX (KEEP=0); an absolute physical path either way.
scratch_dir() {
  if [[ -n "$1" ]]; then
    WORK=$1
    mkdir -p "$WORK"
    KEEP=1
  else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/$2.XXXXXX")
    KEEP=0
  fi
  WORK=$(cd "$WORK" && pwd -P)
}

# copy_tree ROOT DEST: the working tree as git sees it (tracked files that still exist and
# untracked ones git does not ignore; never build outputs), without any built extension or
# build config in DEST, so a stale binary can never be the one a scratch build tests. DEST's
# build/ (a kept scratch dir's object files) is the caller's to keep or remove.
copy_tree() {
  local root=$1 dest=$2
  (cd "$root" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$root" && xargs -0 -r sh -c 'for f; do [ -f "$f" ] && printf "%s\0" "$f"; done' sh) |
    (cd "$root" && tar --null -T - -cf -) | tar -xf - -C "$dest"
  rm -rf "$dest"/rmsnorm_ext/_C*.so "$dest/rmsnorm_ext/_build_config.py"
}
