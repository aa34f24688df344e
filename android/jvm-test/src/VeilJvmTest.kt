// The SDK seen from Kotlin on the JVM, against two real veil-server processes on loopback.
// Run by android/jvm-test/run.sh (and so by .ci/run): it exits non-zero on the first failed check.
import dev.veil.GenerationEvent
import dev.veil.Progress
import dev.veil.Veil
import dev.veil.ffi.CancelHandle
import dev.veil.ffi.GenerationDefaults
import dev.veil.ffi.GenerationOptions
import dev.veil.ffi.LogLevel
import dev.veil.ffi.ServerConfig
import dev.veil.ffi.VeilException
import kotlinx.coroutines.CompletableDeferred
import kotlinx.coroutines.async
import kotlinx.coroutines.awaitAll
import kotlinx.coroutines.cancelAndJoin
import kotlinx.coroutines.delay
import kotlinx.coroutines.flow.buffer
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import java.io.File
import java.nio.file.Files
import java.util.concurrent.CompletableFuture
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicInteger

const val PROMPT = "a small red circle at the top left on a white background"
const val STEPS = 8

class LocalServer(val process: Process, val config: ServerConfig)

/** Starts `veil-server` on 127.0.0.1:0 and reads its fingerprint and bound address from stdout. */
fun startServer(binary: String, model: String, index: Int): LocalServer {
    val dir = Files.createTempDirectory("veil-jvm-$index").toFile()
    val token = "jvm-test-token-$index-" + java.util.UUID.randomUUID()
    File(dir, "tokens.txt").writeText("$token\n")
    val builder = ProcessBuilder(
        binary, "--model", model, "--token-file", File(dir, "tokens.txt").path,
        "--data-dir", File(dir, "data").path, "--listen", "127.0.0.1:0",
    ).redirectError(ProcessBuilder.Redirect.INHERIT)
    builder.environment()["RUST_LOG"] = "warn"
    val process = builder.start()
    val ready = CompletableFuture<Pair<String, String>>()
    Thread {
        var fingerprint: String? = null
        process.inputStream.bufferedReader().forEachLine { line ->
            if (line.startsWith("fingerprint ")) fingerprint = line.removePrefix("fingerprint ").trim()
            if (line.startsWith("listening ") && fingerprint != null) {
                ready.complete(fingerprint!! to line.removePrefix("listening ").trim())
            }
        }
        ready.completeExceptionally(IllegalStateException("veil-server $index exited before listening"))
    }.apply { isDaemon = true }.start()
    val (fingerprint, address) = ready.get(120, TimeUnit.SECONDS)
    return LocalServer(process, ServerConfig(address = address, fingerprint = fingerprint, token = token))
}

var checks = 0
fun check(condition: Boolean, what: () -> String) {
    if (!condition) throw AssertionError("FAILED: " + what())
    checks++
}

/** Width and height from a PNG's IHDR chunk. */
fun pngSize(png: ByteArray): Pair<Int, Int> {
    fun be32(at: Int) = ((png[at].toInt() and 0xff) shl 24) or ((png[at + 1].toInt() and 0xff) shl 16) or
        ((png[at + 2].toInt() and 0xff) shl 8) or (png[at + 3].toInt() and 0xff)
    return be32(16) to be32(20)
}

fun main(args: Array<String>) {
    val (serverBinary, model) = args
    val servers = (0 until 2).map { startServer(serverBinary, model, it) }
    try {
        runBlocking { run(model, servers.map { it.config }) }
    } finally {
        servers.forEach { it.process.destroy() }
    }
    println("kotlin jvm test: $checks checks passed")
}

suspend fun run(model: String, servers: List<ServerConfig>) = kotlinx.coroutines.coroutineScope {
    val veil = Veil.create(Veil.config(model, servers, defaults = GenerationDefaults(steps = STEPS.toUInt())))
    check(veil.policy == "strict") { "policy ${veil.policy}" }

    // 1. One generation: a PNG of the right size, one progress callback per step, in order.
    val seen = mutableListOf<Progress>()
    val image = veil.generate(PROMPT, GenerationOptions(seed = 7uL)) { synchronized(seen) { seen.add(it) } }
    val magic = byteArrayOf(0x89.toByte(), 'P'.code.toByte(), 'N'.code.toByte(), 'G'.code.toByte(), 13, 10, 26, 10)
    check(image.png.size > 33 && image.png.copyOfRange(0, 8).contentEquals(magic)) { "PNG signature" }
    check(pngSize(image.png) == image.width.toInt() to image.height.toInt()) { "IHDR ${pngSize(image.png)} vs ${image.width}x${image.height}" }
    check(image.width > 0u && image.height > 0u) { "size ${image.width}x${image.height}" }
    check(seen == (1..STEPS).map { Progress(it, STEPS) }) { "progress $seen" }
    check(image.seed == 7uL && image.stats.steps == STEPS.toUInt()) { "seed/steps ${image.seed} ${image.stats.steps}" }
    check(image.stats.perServer.size == 2 && image.stats.perServer.all { it.bytesUp > 0uL && it.wireBytesSent > 0uL }) {
        "per-server stats ${image.stats.perServer}"
    }
    // Same seed, same image: the generation is deterministic through the FFI.
    val again = veil.generate(PROMPT, GenerationOptions(seed = 7uL))
    check(again.png.contentEquals(image.png)) { "same seed gave a different image" }

    // 2. Cancel mid-way through the explicit handle: Cancelled, after exactly the step that cancelled.
    val cancel = CancelHandle()
    val lastStep = AtomicInteger()
    try {
        veil.generate(PROMPT, GenerationOptions(steps = 20u), cancel) {
            lastStep.set(it.step)
            if (it.step == 3) cancel.cancel()
        }
        check(false) { "a cancelled generation returned an image" }
    } catch (e: VeilException.Cancelled) {
        check(lastStep.get() == 3) { "cancelled after step ${lastStep.get()}" }
    }

    // 3. Coroutine cancellation reaches Rust: the job ends and the client stays usable.
    val started = CompletableDeferred<Unit>()
    val lastSeen = AtomicInteger()
    val job = launch {
        veil.generate(PROMPT, GenerationOptions(steps = 200u)) {
            lastSeen.set(it.step)
            started.complete(Unit)
        }
    }
    withTimeout(120_000) { started.await() }
    job.cancelAndJoin()
    check(job.isCancelled) { "job not cancelled" }
    // The Rust side stops too: no progress more than a step after the join.
    val atJoin = lastSeen.get()
    delay(1_000)
    check(lastSeen.get() <= atJoin + 1 && lastSeen.get() < 200) { "generation kept running: ${lastSeen.get()} after $atJoin" }

    // 4. Two generations at once on one client, and the Flow form.
    val both = listOf(1uL, 2uL).map { s -> async { veil.generate(PROMPT, GenerationOptions(seed = s, steps = 4u)) } }.awaitAll()
    check(both.all { it.stats.steps == 4u } && !both[0].png.contentEquals(both[1].png)) { "concurrent generations" }
    val events = veil.generateFlow(PROMPT, GenerationOptions(steps = 3u)).toList()
    check(events.size == 4 && events.last() is GenerationEvent.Finished) { "flow events $events" }
    // A slow collector still gets every step, in order (the generation waits for it), even with
    // no buffer between them (a dropping sender loses the steps the collector is not waiting for).
    val slow = mutableListOf<Int>()
    veil.generateFlow(PROMPT, GenerationOptions(steps = STEPS.toUInt())).buffer(0).collect { e ->
        if (e is GenerationEvent.Step) {
            delay(250) // slower than a step
            slow.add(e.progress.step)
        }
    }
    check(slow == (1..STEPS).toList()) { "a slow collector got steps $slow" }

    // 5. A wrong token: AuthFailed naming the server, and the core's warning about it reaches
    // the app's log callback.
    val logLines = java.util.concurrent.CopyOnWriteArrayList<String>()
    check(Veil.setLogger(LogLevel.WARN) { level, target, message -> logLines.add("$level $target $message") }) {
        "the log subscriber was not installed"
    }
    val wrong = servers.mapIndexed { i, s -> if (i == 1) s.copy(token = "not-the-token") else s }
    Veil.create(Veil.config(model, wrong)).use { bad ->
        try {
            bad.generate(PROMPT)
            check(false) { "wrong token accepted" }
        } catch (e: VeilException.AuthFailed) {
            check(e.server == 1u) { "AuthFailed for server ${e.server}" }
            val text = e.describe()
            check(text.startsWith("server 1 (") && text.endsWith(") refused the token")) { "describe: $text" }
            check(!e.isRetryable()) { "a refused token is not worth retrying" }
        }
    }
    Veil.setLogger(onLog = null)
    // An unreachable server: a readable error, worth retrying.
    val gone = servers.mapIndexed { i, s -> if (i == 0) s.copy(address = "127.0.0.1:9") else s }
    Veil.create(Veil.config(model, gone).copy(connectTimeoutSeconds = 1.0)).use { bad ->
        try {
            bad.generate(PROMPT)
            check(false) { "an unreachable server accepted" }
        } catch (e: VeilException) {
            check(e.isRetryable() && e.describe().contains("127.0.0.1:9")) { "unreachable: ${e.describe()}" }
        }
    }
    check(logLines.any { it.startsWith("WARN veil_core::transport") && it.contains("refused the tenant token") }) {
        "log lines $logLines"
    }

    // 6. Config errors before anything is loaded.
    try {
        Veil.create(Veil.config(model, servers, policy = "plaintext"))
        check(false) { "unknown policy accepted" }
    } catch (e: VeilException.InvalidConfig) {
        check(e.message.orEmpty().contains("unknown policy")) { "message ${e.message}" }
    }
    try {
        Veil.create(Veil.config(model, emptyList()))
        check(false) { "zero servers accepted" }
    } catch (e: VeilException.InvalidConfig) {
        checks++
    }
    try {
        Veil.create(Veil.config("/nonexistent/model", servers))
        check(false) { "missing model accepted" }
    } catch (e: VeilException.ModelLoad) {
        checks++
    }

    // 7. The server list as servers.toml text (the CLI's format): the same servers, and the
    // generation with them works; a broken list is a readable config error.
    val toml = servers.joinToString("\n") {
        "[[server]]\naddress = \"${it.address}\"\nfingerprint = \"${it.fingerprint}\"\ntoken = \"${it.token}\"\n"
    }
    val parsed = Veil.servers(toml)
    check(parsed == servers) { "servers.toml gave $parsed" }
    Veil.create(Veil.config(model, parsed)).use { fromToml ->
        check(fromToml.generate(PROMPT, GenerationOptions(steps = 2u)).png.isNotEmpty()) { "no image" }
    }
    try {
        Veil.servers("[[server]]\naddress = 1\n")
        check(false) { "a broken server list accepted" }
    } catch (e: VeilException.InvalidConfig) {
        check(e.message.orEmpty().contains("server list")) { "message ${e.message}" }
    }
    veil.close()
}
