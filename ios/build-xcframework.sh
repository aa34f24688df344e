#!/usr/bin/env bash
# Builds VeilFFIFFI.xcframework (static libveil_ffi + the generated C header and module map)
# for iPhone (aarch64-apple-ios), the simulator on Apple silicon (aarch64-apple-ios-sim) and
# macOS (aarch64-apple-darwin). Needs macOS with Xcode and:
#   rustup target add aarch64-apple-ios aarch64-apple-ios-sim aarch64-apple-darwin
# candle's Metal backend is turned on here only (feature `metal`): never on Linux/Android.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(uname)" = "Darwin" ] || { echo "build-xcframework.sh needs macOS with Xcode (xcodebuild)"; exit 1; }

profile=${PROFILE:-mobile}
dir=$profile
[ "$profile" = dev ] && dir=debug
targets=(aarch64-apple-ios aarch64-apple-ios-sim aarch64-apple-darwin)
for t in "${targets[@]}"; do
    cargo build -p veil-ffi --lib --profile "$profile" --target "$t" --features metal
done

# Bindings from the host library, so the Swift sources match what was just built.
bindings/generate.sh

headers=$(mktemp -d)
trap 'rm -rf "$headers"' EXIT
cp ios/Sources/VeilFFIFFI/VeilFFIFFI.h "$headers/"
cp ios/Sources/VeilFFIFFI/module.modulemap "$headers/module.modulemap"

out=ios/VeilFFIFFI.xcframework
rm -rf "$out"
args=()
for t in "${targets[@]}"; do
    args+=(-library "target/$t/$dir/libveil_ffi.a" -headers "$headers")
done
xcodebuild -create-xcframework "${args[@]}" -output "$out"
echo "wrote $out"
