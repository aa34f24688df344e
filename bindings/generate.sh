#!/usr/bin/env bash
# Generates the Kotlin and Swift bindings of veil-ffi — and of veil-core's SDK types, which it
# exports through their UniFFI derives (the core's `uniffi` feature) — in library mode, and puts
# them where the Android library and the Swift package use them:
#   android/veil/src/main/kotlin/dev/veil/{ffi/veil_ffi.kt,core/veil_core.kt}
#   ios/Sources/VeilFFI/{VeilFFI.swift,VeilCore.swift} (one Swift module)
#   ios/Sources/VeilFFIFFI/{VeilFFIFFI.h,VeilCoreFFI.h,module.modulemap} (both C modules)
# One change to the generated Kotlin: `VeilException.message` is the error's sentence
# (`describe()`, Rust's Display) instead of UniFFI's `field=value` list (see below).
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

# UniFFI's Kotlin exception of a rich error reports `field=value, …` as its message; apps show
# `e.message`, so it returns the Rust Display text (the error's exported `describe()`). Fails
# unless every variant of VeilException was rewritten.
python3 - "$gen/kotlin/dev/veil/core/veil_core.kt" <<'PY'
import re, sys
path = sys.argv[1]
src = open(path).read()
start = src.index("sealed class VeilException")
end = src.index("companion object ErrorHandler", start)
body, n = re.subn(r'override val message\n(\s*)get\(\) = "[^"\n]*"',
                  r'override val message\n\1get() = describe()', src[start:end])
variants = len(re.findall(r"\n    class \w+\(", src[start:end]))
if n == 0 or n != variants:
    sys.exit(f"generate.sh: rewrote {n} VeilException messages of {variants} variants")
open(path, "w").write(src[:start] + body + src[end:])
PY
# Both crates' C modules in the one module map the XCFramework carries.
{ cat "$gen/swift/VeilFFIFFI.modulemap"; echo; cat "$gen/swift/VeilCoreFFI.modulemap"; echo; } > "$gen/swift/module.modulemap"

# generated file -> committed path
pairs=(
    "kotlin/dev/veil/ffi/veil_ffi.kt android/veil/src/main/kotlin/dev/veil/ffi/veil_ffi.kt"
    "kotlin/dev/veil/core/veil_core.kt android/veil/src/main/kotlin/dev/veil/core/veil_core.kt"
    "swift/VeilFFI.swift ios/Sources/VeilFFI/VeilFFI.swift"
    "swift/VeilCore.swift ios/Sources/VeilFFI/VeilCore.swift"
    "swift/VeilFFIFFI.h ios/Sources/VeilFFIFFI/VeilFFIFFI.h"
    "swift/VeilCoreFFI.h ios/Sources/VeilFFIFFI/VeilCoreFFI.h"
    "swift/module.modulemap ios/Sources/VeilFFIFFI/module.modulemap"
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
