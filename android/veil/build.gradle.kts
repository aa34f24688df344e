plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.veil"
    compileSdk = 35
    defaultConfig {
        minSdk = 26
        // Keep rules travel with the AAR: apps that minify keep the JNA-bound classes.
        consumerProguardFiles("consumer-rules.pro")
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }
    // src/main/jniLibs/<abi>/libveil_ffi.so come from ../build-jni-libs.sh (cargo-ndk).
    sourceSets["main"].kotlin.srcDirs("src/main/kotlin")
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    // The generated bindings call the native library through JNA (the AAR carries its .so).
    api("net.java.dev.jna:jna:5.15.0@aar")
    api("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0")
}
