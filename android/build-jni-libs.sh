#!/usr/bin/env bash
# Builds libveil_ffi.so for the Android ABIs into veil/src/main/jniLibs with cargo-ndk, and
# refreshes the generated Kotlin bindings. Needs the Android NDK (ANDROID_NDK_HOME) and:
#   cargo install cargo-ndk
#   rustup target add aarch64-linux-android x86_64-linux-android
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-ndk >/dev/null || { echo "cargo-ndk is required: cargo install cargo-ndk"; exit 1; }
[ -n "${ANDROID_NDK_HOME:-}" ] || { echo "set ANDROID_NDK_HOME to an installed NDK"; exit 1; }
cargo ndk -t arm64-v8a -t x86_64 --platform 26 -o android/veil/src/main/jniLibs \
    build -p veil-ffi --lib --profile "${PROFILE:-mobile}"
bindings/generate.sh
