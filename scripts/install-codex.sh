#!/usr/bin/env bash
# Installs a pinned @openai/codex into a cache outside the repository and links
# <prefix>/bin/codex. Usage: install-codex.sh VERSION PREFIX
#
# The npm package is a small node launcher; the native binary ships in a per-platform package
# (@openai/codex-linux-x64 = npm:@openai/codex@VERSION-linux-x64, ...) that npm installs as an
# *optional* dependency. Anything that omits optional dependencies (npm_config_omit=optional, an
# .npmrc with omit=optional, --no-optional) leaves a launcher that fails with "Missing optional
# dependency", so we ask for optional dependencies explicitly, install the platform package by
# name when it is still missing, and only call the install good once `codex --version` answers.
#
# Without npm the end-to-end tests skip; in CI (CI=true) any failure here is an error.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 VERSION PREFIX" >&2
  exit 2
fi
version="$1"
prefix="${2%/}"
case "$prefix" in
  "" | / | "$HOME") echo "install-codex: refusing prefix '$2' (it is replaced wholesale)" >&2; exit 2 ;;
esac

fail() {
  echo "install-codex: $*" >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  echo "install-codex: codex end-to-end tests will be skipped" >&2
  exit 0
}

works() { # works BIN: BIN runs and reports the pinned version
  [ -x "$1" ] && "$1" --version 2>/dev/null | grep -qF "codex-cli $version"
}

if works "$prefix/bin/codex"; then exit 0; fi

command -v npm >/dev/null 2>&1 || fail "npm not found"
command -v node >/dev/null 2>&1 || fail "node not found (the codex launcher is a node script)"

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) platform=linux-x64 ;;
  Linux-aarch64 | Linux-arm64) platform=linux-arm64 ;;
  Darwin-x86_64) platform=darwin-x64 ;;
  Darwin-arm64) platform=darwin-arm64 ;;
  *) fail "no codex binary is published for $(uname -s) $(uname -m)" ;;
esac

# Build in a staging folder next to the prefix and swap it in at the end, so that an interrupted
# install never leaves a prefix that looks installed.
parent="$(dirname "$prefix")"
mkdir -p "$parent"
staging="$(mktemp -d "$parent/.codex-install.XXXXXX")"
chmod 755 "$staging"
log="$staging.log"
trap 'rm -rf "$staging" "$log"' EXIT

npm_install() {
  npm install --no-audit --no-fund --no-save --include=optional --loglevel=error \
    --prefix "$staging" "$@" >>"$log" 2>&1
}

if ! npm_install "@openai/codex@$version"; then
  tail -n 20 "$log" >&2 || true
  fail "npm install @openai/codex@$version failed"
fi
launcher="$staging/node_modules/.bin/codex"
if ! works "$launcher"; then
  # The alias is how @openai/codex itself names its platform package.
  if ! npm_install "@openai/codex@$version" "@openai/codex-$platform@npm:@openai/codex@$version-$platform"; then
    tail -n 20 "$log" >&2 || true
    fail "npm install of the native package @openai/codex@$version-$platform failed"
  fi
fi
if ! works "$launcher"; then
  "$launcher" --version >&2 || true
  fail "codex $version was installed but does not run"
fi

mkdir -p "$staging/bin"
# Relative, so the link keeps working after the folder is renamed into place.
ln -sf ../node_modules/.bin/codex "$staging/bin/codex"
rm -rf "$prefix"
mv "$staging" "$prefix"
works "$prefix/bin/codex" || fail "codex at $prefix/bin/codex does not run after the move"
echo "install-codex: codex $version at $prefix/bin/codex"
