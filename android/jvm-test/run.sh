#!/usr/bin/env bash
# Compiles the generated Kotlin bindings + the idiomatic layer (android/veil/src/main/kotlin) +
# the JVM test with kotlinc, and runs it against libveil_ffi, two shard veil-server processes
# and one full-model one (the obfuscated policy), comparing the privacy report with the veil CLI.
#
# Needs: kotlinc and kotlinx-coroutines-core-jvm.jar (npm package kotlin-compiler), JNA
# (Debian libjna-java). KOTLIN_HOME defaults to the npm package unpacked by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."

KOTLIN_HOME=${KOTLIN_HOME:-$PWD/target/kotlin-compiler/package}
JNA_JAR=${JNA_JAR:-/usr/share/java/jna.jar}
COROUTINES_JAR=$KOTLIN_HOME/lib/kotlinx-coroutines-core-jvm.jar
for f in "$KOTLIN_HOME/bin/kotlinc" "$JNA_JAR" "$COROUTINES_JAR"; do
    [ -e "$f" ] || { echo "missing $f (see .ci/run for the install steps)"; exit 1; }
done

cargo build -q -p veil-ffi -p veil-server -p veil-cli
out=target/kotlin-jvm-test
mkdir -p "$out"
echo "kotlinc: compiling bindings + Veil.kt + test"
"$KOTLIN_HOME/bin/kotlinc" -nowarn -include-runtime -d "$out/test.jar" \
    -cp "$JNA_JAR:$COROUTINES_JAR" \
    android/veil/src/main/kotlin/dev/veil/ffi/veil_ffi.kt \
    android/veil/src/main/kotlin/dev/veil/core/veil_core.kt \
    android/veil/src/main/kotlin/dev/veil/Veil.kt \
    android/jvm-test/src/VeilJvmTest.kt
java -Djna.library.path="$PWD/target/debug" -cp "$out/test.jar:$JNA_JAR:$COROUTINES_JAR" \
    VeilJvmTestKt "$PWD/target/debug/veil-server" "$PWD/models/tiny-random" "$PWD/target/debug/veil"
