// Veil for Android: the library module (:veil, an AAR with libveil_ffi.so for arm64-v8a and
// x86_64) and a Compose demo app (:demo). Build the native libraries first:
//   ./build-jni-libs.sh && ./gradlew :veil:assembleRelease :demo:assembleDebug
// Publishing (maven-publish, version from gradle.properties): ./gradlew :veil:publish (README.md).
plugins {
    id("com.android.library") version "8.7.3" apply false
    id("com.android.application") version "8.7.3" apply false
    id("org.jetbrains.kotlin.android") version "2.1.0" apply false
    id("org.jetbrains.kotlin.plugin.compose") version "2.1.0" apply false
}
