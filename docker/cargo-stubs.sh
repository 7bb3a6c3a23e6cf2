#!/bin/sh
# Used by docker/Dockerfile to build the dependencies before the sources are copied in, so
# that a change to the sources does not rebuild every dependency.
#
# Writes an empty src/main.rs and src/lib.rs, and an empty file for every [[bench]], [[test]]
# and [[example]] target that Cargo.toml declares: Cargo refuses a manifest whose declared
# targets are missing, even when building something else. Existing files are left alone.
set -eu

manifest=${1:-Cargo.toml}

stub() {
    [ -e "$1" ] && return 0
    mkdir -p "$(dirname "$1")"
    echo 'fn main() {}' > "$1"
}

stub src/main.rs
[ -e src/lib.rs ] || { mkdir -p src && : > src/lib.rs; }

awk '
    function flush() {
        if (kind != "" && (name != "" || path != "")) print (path != "" ? path : dir "/" name ".rs")
        kind = ""
    }
    /^[ \t]*\[/ { flush() }
    /^[ \t]*\[\[(bench|test|example)\]\]/ {
        match($0, /bench|test|example/)
        kind = substr($0, RSTART, RLENGTH)
        dir = (kind == "bench") ? "benches" : kind "s"
        name = ""
        path = ""
        next
    }
    kind != "" && /^[ \t]*name[ \t]*=/ { split($0, part, "\""); name = part[2] }
    kind != "" && /^[ \t]*path[ \t]*=/ { split($0, part, "\""); path = part[2] }
    END { flush() }
' "$manifest" | while read -r file; do
    stub "$file"
done
