#!/bin/sh
# Rebuild the seed corpora from the fixtures (made by real Nix 2.8) and merge them,
# minimised, into fuzz/corpus/<target>. Run from anywhere; needs cargo-fuzz and nightly.
#   fuzz/seed.sh            # all targets
#   fuzz/seed.sh aterm json # some
set -eu
fuzz=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$fuzz")
seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
mkdir -p "$seeds/aterm" "$seeds/json" "$seeds/nar"
cd "$root"
# Unique names from the paths (many fixtures share a base name).
copy() { cp "$1" "$2/$(echo "$1" | tr / _)"; }
find fixtures -name '*.drv' -type f | while read -r f; do copy "$f" "$seeds/aterm"; done
{ find fixtures -name 'show-derivation*.json' -type f; echo fixtures/demo/hello.json;
  find fixtures/malformed -name '*.nix.out' -size +2c; } | while read -r f; do copy "$f" "$seeds/json"; done
find fixtures -name '*.nar' -type f | while read -r f; do copy "$f" "$seeds/nar"; done
# A few shapes the fixtures lack: empty file, executable, top-level symlink, empty and
# nested directories, a symlink to '..'.
python3 - "$seeds/nar" <<'PY'
import struct, sys
def s(b): return struct.pack('<Q', len(b)) + b + b'\0' * (-len(b) % 8)
def nar(*t): return b''.join(s(x) for x in (b'nix-archive-1',) + t)
reg = (b'(', b'type', b'regular')
seeds = {
    'empty-file': nar(*reg, b'contents', b'', b')'),
    'exec-file': nar(*reg, b'executable', b'', b'contents', b'#!/bin/sh\n', b')'),
    'symlink': nar(b'(', b'type', b'symlink', b'target', b'/etc/passwd', b')'),
    'empty-dir': nar(b'(', b'type', b'directory', b')'),
    'nested': nar(b'(', b'type', b'directory',
        b'entry', b'(', b'name', b'd', b'node', b'(', b'type', b'directory',
        b'entry', b'(', b'name', b'x', b'node', *reg, b'executable', b'', b'contents', b'hi', b')', b')',
        b')', b')',
        b'entry', b'(', b'name', b'l', b'node', b'(', b'type', b'symlink', b'target', b'd/x', b')', b')',
        b')'),
    'dotdot-symlink': nar(b'(', b'type', b'directory',
        b'entry', b'(', b'name', b'up', b'node', b'(', b'type', b'symlink', b'target', b'..', b')', b')',
        b')'),
}
for k, v in seeds.items():
    open(sys.argv[1] + '/hand-' + k, 'wb').write(v)
PY
targets=${*:-aterm json nar_parse nar_restore}
cd "$fuzz"
for t in $targets; do
    case $t in nar_*) src=nar ;; *) src=$t ;; esac
    mkdir -p "corpus/$t"
    cargo +nightly fuzz run -O -a "$t" "corpus/$t" "$seeds/$src" -- -merge=1
done
