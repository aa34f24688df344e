plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
    `maven-publish`
}

// Coordinates and POM from ../gradle.properties; VERSION_NAME is the Rust workspace's version
// (scripts/check-version.sh).
fun prop(name: String): String = providers.gradleProperty(name).get()

group = prop("GROUP")
version = prop("VERSION_NAME")

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
    // The AAR and a sources jar, published as the software component "release".
    publishing {
        singleVariant("release") {
            withSourcesJar()
        }
    }
}

dependencies {
    // The generated bindings call the native library through JNA (the AAR carries its .so).
    api("net.java.dev.jna:jna:5.15.0@aar")
    api("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0")
}

// ./gradlew :veil:publish uploads dev.veil:veil:VERSION_NAME to VEIL_MAVEN_URL (a gradle property
// or environment variable; credentials VEIL_MAVEN_USER / VEIL_MAVEN_PASSWORD), or without it to
// the folder veil/build/repo; ./gradlew :veil:publishToMavenLocal to ~/.m2. See ../README.md.
fun setting(name: String): String? =
    providers.gradleProperty(name).orElse(providers.environmentVariable(name)).orNull?.takeIf { it.isNotBlank() }

publishing {
    publications {
        register<MavenPublication>("release") {
            groupId = prop("GROUP")
            artifactId = prop("POM_ARTIFACT_ID")
            version = prop("VERSION_NAME")
            // The component exists once AGP has created the variants.
            afterEvaluate {
                from(components["release"])
            }
            pom {
                name.set(prop("POM_NAME"))
                description.set(prop("POM_DESCRIPTION"))
                licenses {
                    license {
                        name.set(prop("POM_LICENSE"))
                        url.set(prop("POM_LICENSE_URL"))
                        distribution.set("repo")
                    }
                }
            }
        }
    }
    repositories {
        maven {
            name = "veil"
            val remote = setting("VEIL_MAVEN_URL")
            if (remote == null) {
                url = uri(layout.buildDirectory.dir("repo"))
            } else {
                url = uri(remote)
                val user = setting("VEIL_MAVEN_USER")
                val secret = setting("VEIL_MAVEN_PASSWORD")
                if (user != null && secret != null) {
                    credentials {
                        username = user
                        password = secret
                    }
                }
            }
        }
    }
}

// A published AAR without the native library would fail only in apps: refuse to publish one.
val jniLibsDir = layout.projectDirectory.dir("src/main/jniLibs")
tasks.withType<AbstractPublishToMaven>().configureEach {
    doFirst {
        val missing = listOf("arm64-v8a", "x86_64").filter { abi ->
            !jniLibsDir.file("$abi/libveil_ffi.so").asFile.isFile
        }
        check(missing.isEmpty()) {
            "no libveil_ffi.so for $missing in src/main/jniLibs: run ../build-jni-libs.sh before publishing"
        }
    }
}
