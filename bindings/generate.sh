#!/usr/bin/env bash
# Generates the Kotlin and Swift bindings of veil-ffi in library mode and puts them where the
# Android library and the Swift package use them:
#   android/veil/src/main/kotlin/dev/veil/ffi/veil_ffi.kt
#   ios/Sources/VeilFFI/VeilFFI.swift, ios/Sources/VeilFFIFFI/{VeilFFIFFI.h,module.modulemap}
# `--check` writes nothing and fails when the committed files differ from a fresh generation
# (CI runs it: the bindings in the repo always match the Rust surface).
set -euo pipefail
cd "$(dirname "$0")/.."

check=0
[ "${1:-}" = "--check" ] && check=1

cargo build -q -p veil-ffi -p uniffi-bindgen
lib=target/debug/libveil_ffi.so
[ "$(uname)" = "Darwin" ] && lib=target/debug/libveil_ffi.dylib
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
for language in kotlin swift; do
    target/debug/uniffi-bindgen generate --no-format --library "$lib" --language "$language" \
        --out-dir "$gen/$language" >/dev/null
done

# generated file -> committed path
pairs=(
    "kotlin/dev/veil/ffi/veil_ffi.kt android/veil/src/main/kotlin/dev/veil/ffi/veil_ffi.kt"
    "swift/VeilFFI.swift ios/Sources/VeilFFI/VeilFFI.swift"
    "swift/VeilFFIFFI.h ios/Sources/VeilFFIFFI/VeilFFIFFI.h"
    "swift/VeilFFIFFI.modulemap ios/Sources/VeilFFIFFI/module.modulemap"
)
status=0
for pair in "${pairs[@]}"; do
    set -- $pair
    if [ $check = 1 ]; then
        if ! diff -q "$gen/$1" "$2" >/dev/null 2>&1; then
            echo "stale bindings: $2 differs from a fresh generation (run bindings/generate.sh)"
            diff -u "$2" "$gen/$1" | head -20 || true
            status=1
        fi
    else
        mkdir -p "$(dirname "$2")"
        cp "$gen/$1" "$2"
        echo "wrote $2"
    fi
done
[ $check = 1 ] && [ $status = 0 ] && echo "bindings up to date (kotlin, swift)"
exit $status
