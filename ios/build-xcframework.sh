#!/usr/bin/env bash
# Builds VeilFFIFFI.xcframework (static libveil_ffi + the generated C headers and module map)
# for iPhone (aarch64-apple-ios), the simulator on Apple silicon (aarch64-apple-ios-sim) and
# macOS (aarch64-apple-darwin). Needs macOS with Xcode and:
#   rustup target add aarch64-apple-ios aarch64-apple-ios-sim aarch64-apple-darwin
# candle's Metal backend is turned on here only (feature `metal`): never on Linux/Android.
#
# Then zips it for SwiftPM: ios/dist/VeilFFIFFI.xcframework.zip and its checksum
# (`swift package compute-checksum`) in ios/dist/VeilFFIFFI.xcframework.zip.sha256. With
# --release (or whenever VEIL_XCFRAMEWORK_URL is set) it also writes the release manifest
# ios/dist/Package.swift (ios/release-package.sh): binaryTarget(url: $VEIL_XCFRAMEWORK_URL,
# checksum: …). VEIL_XCFRAMEWORK_URL is the full https URL the zip will be downloaded from, e.g.
#   VEIL_XCFRAMEWORK_URL=https://github.com/ORG/veil/releases/download/0.1.0/VeilFFIFFI.xcframework.zip \
#       ios/build-xcframework.sh --release
set -euo pipefail
cd "$(dirname "$0")/.."

release=0
case "${1:-}" in
    --release) release=1 ;;
    "") ;;
    *) echo "usage: ios/build-xcframework.sh [--release]"; exit 2 ;;
esac
url=${VEIL_XCFRAMEWORK_URL:-}
[ -n "$url" ] && release=1
if [ "$release" = 1 ] && [ -z "$url" ]; then
    echo "build-xcframework.sh --release: set VEIL_XCFRAMEWORK_URL to the full https URL the zip will be"
    echo "downloaded from, e.g. https://github.com/ORG/veil/releases/download/0.1.0/VeilFFIFFI.xcframework.zip"
    exit 1
fi

if [ "$release" = 1 ]; then
    # Refuse a bad URL now, not after the long build (the checksum is a stand-in here).
    ios/release-package.sh --url "$url" --checksum "$(printf '%064d' 0)" --out - >/dev/null
fi

[ "$(uname)" = "Darwin" ] || { echo "build-xcframework.sh needs macOS with Xcode (xcodebuild)"; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

profile=${PROFILE:-mobile}
dir=$profile
[ "$profile" = dev ] && dir=debug
targets=(aarch64-apple-ios aarch64-apple-ios-sim aarch64-apple-darwin)
for t in "${targets[@]}"; do
    cargo build -p veil-ffi --lib --profile "$profile" --target "$t" --features metal
done

# Bindings from the host library, so the Swift sources match what was just built.
bindings/generate.sh

# Every generated header (one per UniFFI crate, e.g. VeilFFIFFI.h and veil_coreFFI.h) and the
# module map that lists them.
headers=$work/headers
mkdir -p "$headers"
shopt -s nullglob
generated=(ios/Sources/VeilFFIFFI/*.h)
shopt -u nullglob
[ ${#generated[@]} -gt 0 ] || { echo "no generated headers in ios/Sources/VeilFFIFFI (bindings/generate.sh)"; exit 1; }
[ -f ios/Sources/VeilFFIFFI/module.modulemap ] || { echo "no ios/Sources/VeilFFIFFI/module.modulemap"; exit 1; }
cp "${generated[@]}" "$headers/"
cp ios/Sources/VeilFFIFFI/module.modulemap "$headers/module.modulemap"

out=ios/VeilFFIFFI.xcframework
rm -rf "$out"
args=()
for t in "${targets[@]}"; do
    args+=(-library "target/$t/$dir/libveil_ffi.a" -headers "$headers")
done
xcodebuild -create-xcframework "${args[@]}" -output "$out"
echo "wrote $out"

# The zip SwiftPM downloads: the .xcframework folder at the archive's root, no resource forks.
dist=ios/dist
zip=$dist/VeilFFIFFI.xcframework.zip
mkdir -p "$dist"
rm -f "$zip" "$zip.sha256" "$dist/Package.swift"
ditto -c -k --sequesterRsrc --keepParent "$out" "$zip"
# Older SwiftPM wants a manifest in the working directory even for compute-checksum.
mkdir -p "$work/checksum"
printf '// swift-tools-version:5.9\nimport PackageDescription\nlet package = Package(name: "Checksum")\n' \
    > "$work/checksum/Package.swift"
checksum=$(root=$PWD && cd "$work/checksum" && swift package compute-checksum "$root/$zip")
sha=$(shasum -a 256 "$zip" | awk '{print $1}')
[ "$checksum" = "$sha" ] || { echo "swift's checksum $checksum is not the zip's SHA-256 $sha"; exit 1; }
echo "$checksum" > "$zip.sha256"
echo "wrote $zip (checksum $checksum, also in $zip.sha256)"

if [ "$release" = 1 ]; then
    ios/release-package.sh --url "$url" --checksum "$checksum" --out "$dist/Package.swift"
    python3 ios/check-release.py --manifest "$dist/Package.swift" --zip "$zip"
    echo "release: upload $zip to $url, then publish $dist/Package.swift (ios/README.md, Releasing)"
fi
