// The SDK seen from Kotlin on the JVM, against two real veil-server processes on loopback.
// Run by android/jvm-test/run.sh (and so by .ci/run): it exits non-zero on the first failed check.
import dev.veil.GenerationEvent
import dev.veil.Progress
import dev.veil.Veil
import dev.veil.seedLong
import dev.veil.size
import dev.veil.core.GeneratedImage
import dev.veil.core.Policy
import dev.veil.core.ServerConfig
import dev.veil.core.VeilException
import dev.veil.ffi.CancelHandle
import dev.veil.ffi.LogLevel
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

/**
 * Starts `veil-server` on 127.0.0.1:0 (with `--full-model`: the obfuscated policy's server) and
 * reads its fingerprint and bound address from stdout.
 */
fun startServer(binary: String, model: String, index: Int, fullModel: Boolean = false): LocalServer {
    val dir = Files.createTempDirectory("veil-jvm-$index").toFile()
    val token = "jvm-test-token-$index-" + java.util.UUID.randomUUID()
    File(dir, "tokens.txt").writeText("$token\n")
    val builder = ProcessBuilder(
        binary, "--model", model, "--token-file", File(dir, "tokens.txt").path,
        "--data-dir", File(dir, "data").path, "--listen", "127.0.0.1:0",
        *(if (fullModel) arrayOf("--full-model") else emptyArray()),
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
    val (serverBinary, model, cli) = args
    val servers = (0 until 2).map { startServer(serverBinary, model, it) }
    val full = startServer(serverBinary, model, 2, fullModel = true)
    try {
        runBlocking {
            run(model, servers.map { it.config })
            privacyAndPreviews(model, servers.map { it.config }, cli)
            obfuscated(model, full.config)
        }
    } finally {
        (servers + full).forEach { it.process.destroy() }
    }
    println("kotlin jvm test: $checks checks passed")
}

suspend fun run(model: String, servers: List<ServerConfig>) = kotlinx.coroutines.coroutineScope {
    val veil = Veil.create(Veil.config(model, servers, steps = STEPS))
    check(veil.policy == Policy.STRICT) { "policy ${veil.policy}" }

    // 1. One generation: a PNG of the right size, one progress callback per step, in order.
    val seen = mutableListOf<Progress>()
    val image = veil.generate(PROMPT, Veil.options(seed = 7L)) { synchronized(seen) { seen.add(it) } }
    val magic = byteArrayOf(0x89.toByte(), 'P'.code.toByte(), 'N'.code.toByte(), 'G'.code.toByte(), 13, 10, 26, 10)
    check(image.png.size > 33 && image.png.copyOfRange(0, 8).contentEquals(magic)) { "PNG signature" }
    check(pngSize(image.png) == image.width.toInt() to image.height.toInt()) { "IHDR ${pngSize(image.png)} vs ${image.width}x${image.height}" }
    check(image.width > 0u && image.height > 0u) { "size ${image.width}x${image.height}" }
    check(seen == (1..STEPS).map { Progress(it, STEPS) }) { "progress $seen" }
    check(image.seedLong == 7L && image.stats.steps == STEPS.toUInt()) { "seed/steps ${image.seed} ${image.stats.steps}" }
    check(image.stats.perServer.size == 2 && image.stats.perServer.all { it.bytesUp > 0uL && it.wireBytesSent > 0uL }) {
        "per-server stats ${image.stats.perServer}"
    }
    // Same seed, same image: the generation is deterministic through the FFI.
    val again = veil.generate(PROMPT, Veil.options(seed = 7L))
    check(again.png.contentEquals(image.png)) { "same seed gave a different image" }

    // 2. Cancel mid-way through the explicit handle: Cancelled, after exactly the step that cancelled.
    val cancel = CancelHandle()
    val lastStep = AtomicInteger()
    try {
        veil.generate(PROMPT, Veil.options(steps = 20), cancel) {
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
        veil.generate(PROMPT, Veil.options(steps = 200)) {
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
    val both = listOf(1L, 2L).map { s -> async { veil.generate(PROMPT, Veil.options(seed = s, steps = 4)) } }.awaitAll()
    check(both.all { it.stats.steps == 4u } && !both[0].png.contentEquals(both[1].png)) { "concurrent generations" }
    val events = veil.generateFlow(PROMPT, Veil.options(steps = 3)).toList()
    check(events.size == 4 && events.last() is GenerationEvent.Finished) { "flow events $events" }
    // A slow collector still gets every step, in order (the generation waits for it), even with
    // no buffer between them (a dropping sender loses the steps the collector is not waiting for).
    val slow = mutableListOf<Int>()
    veil.generateFlow(PROMPT, Veil.options(steps = STEPS)).buffer(0).collect { e ->
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
            val text = e.message.orEmpty()
            check(text.startsWith("server 1 (") && text.endsWith(") refused the token")) { "message: $text" }
            check(text == e.describe()) { "message ${e.message} vs describe ${e.describe()}" }
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

    // 6. Config errors before anything is loaded: the research-only policy without its
    // opt-in, with the reason in the message.
    try {
        Veil.create(Veil.config(model, servers, policy = Policy.PPIDM))
        check(false) { "ppidm accepted without the research opt-in" }
    } catch (e: VeilException.InvalidConfig) {
        check(e.message.orEmpty().startsWith("invalid configuration: policy ppidm is research only")) { "message ${e.message}" }
    }
    Veil.create(Veil.config(model, servers, policy = Policy.PPIDM, allowResearchPolicies = true)).use {
        check(it.policy == Policy.PPIDM) { "opt-in ppidm" }
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
        check(fromToml.generate(PROMPT, Veil.options(steps = 2)).png.isNotEmpty()) { "no image" }
    }
    try {
        Veil.servers("[[server]]\naddress = 1\n")
        check(false) { "a broken server list accepted" }
    } catch (e: VeilException.InvalidConfig) {
        check(e.message.orEmpty().contains("server list")) { "message ${e.message}" }
    }
    veil.close()
}

/** A number field of a pretty-printed JSON object's text. */
fun jsonNumber(obj: String, key: String): Long =
    Regex("\"$key\": (\\d+)").find(obj)?.groupValues?.get(1)?.toLong()
        ?: throw AssertionError("no $key in $obj")

/**
 * 8. Previews every 3 steps, decoded as images of 1/8 the image's size; and the privacy
 * report's per-server figures equal to `veil generate --audit` of the same run (same servers,
 * prompt, seed, steps, guidance, scheduler).
 */
suspend fun privacyAndPreviews(model: String, servers: List<ServerConfig>, cli: String) {
    val veil = Veil.create(Veil.config(model, servers, steps = STEPS))
    val previews = mutableListOf<Progress>()
    val image = veil.generate(PROMPT, Veil.options(seed = 11L, previewEverySteps = 3)) { p ->
        if (p.preview != null) synchronized(previews) { previews.add(p) }
    }
    check(previews.map { it.step } == listOf(3, 6, 8)) { "previews at ${previews.map { it.step }}" }
    for (p in previews) {
        val decoded = javax.imageio.ImageIO.read(java.io.ByteArrayInputStream(p.preview!!.png))
        check(decoded != null && decoded.width to decoded.height == p.preview!!.size) { "preview PNG ${p.preview!!.size}" }
        check(p.preview!!.size == image.size.first / 8 to image.size.second / 8) { "preview ${p.preview!!.size} of ${image.size}" }
    }
    checkPrivacyAgainstCli(image, model, servers, cli)

    // Image-to-image from the image just made: strength 0.5 of 8 steps runs the last 4; a
    // strength that keeps no step is a readable InvalidRequest.
    val steps = mutableListOf<Progress>()
    val edited = veil.generate(PROMPT, Veil.options(seed = 12L, initImage = image.png, strength = 0.5)) { synchronized(steps) { steps.add(it) } }
    check(edited.stats.steps == 4u && steps.map { it.step } == (1..4).toList() && edited.size == image.size) {
        "img2img ran ${edited.stats.steps} steps ${steps.map { it.step }}, size ${edited.size}"
    }
    check(!edited.png.contentEquals(image.png)) { "img2img returned the init image" }
    try {
        veil.generate(PROMPT, Veil.options(initImage = image.png, strength = 0.01))
        check(false) { "a strength keeping no step accepted" }
    } catch (e: VeilException.InvalidRequest) {
        check(e.message.orEmpty().contains("strength")) { "message ${e.message}" }
    }
    veil.close()
}

fun checkPrivacyAgainstCli(image: GeneratedImage, model: String, servers: List<ServerConfig>, cli: String) {
    val report = image.privacy
    check(report.policy == Policy.STRICT && report.haloBound == 1u && report.servers.size == 2) { "report $report" }
    // Under strict no server gets text tokens, text keys/values or prompts; the strips it gets
    // back after the phone's cross-attention do depend on the prompt (docs/PRIVACY.md), and the
    // report says so.
    check(report.servers.all { it.bytes > 0uL && it.textIndexedBytes == 0uL && it.prompts.isEmpty() }) {
        "strict servers received text tokens: ${report.servers}"
    }
    check(report.servers.all { it.receivedText == (it.textBytes > 0uL) && it.bytesByKind.keys.none { k -> k.contains("key_value") } }) {
        "received-text flags ${report.servers}"
    }
    val dir = Files.createTempDirectory("veil-jvm-cli").toFile()
    val list = File(dir, "servers.toml")
    list.writeText(servers.joinToString("\n") {
        "[[server]]\naddress = \"${it.address}\"\nfingerprint = \"${it.fingerprint}\"\ntoken = \"${it.token}\"\n"
    })
    val audit = File(dir, "audit.json")
    val proc = ProcessBuilder(
        cli, "generate", PROMPT, "--model", model, "--server-list", list.path, "--policy", "strict",
        "--steps", "$STEPS", "--seed", "11", "--guidance", "5", "--scheduler", "ddim",
        "--audit", audit.path, "--out", File(dir, "cli.png").path,
    ).redirectErrorStream(true).start()
    val output = proc.inputStream.bufferedReader().readText()
    check(proc.waitFor(300, TimeUnit.SECONDS) && proc.exitValue() == 0) { "veil generate failed: $output" }
    check(File(dir, "cli.png").readBytes().contentEquals(image.png)) { "the CLI's image differs from the SDK's" }
    val objects = audit.readText().split(Regex("\"server\": ")).drop(1)
    check(objects.size == report.servers.size) { "audit has ${objects.size} servers" }
    for ((obj, view) in objects.zip(report.servers)) {
        val theirs = listOf("bytes", "tensors", "raw", "whole_map", "text", "text_indexed_bytes").map { jsonNumber(obj, it) }
        val ours = listOf(view.bytes, view.tensors, view.rawBytes, view.wholeMapBytes, view.textBytes, view.textIndexedBytes)
            .map { it.toLong() }
        check(theirs == ours) { "server ${view.server}: CLI audit $theirs, SDK report $ours" }
        for (res in view.rows) {
            val key = "\"${res.height}x${res.width}\": ["
            check(obj.contains(key)) { "audit lacks resolution ${res.height}x${res.width}" }
        }
    }
}

/** 9. The obfuscated policy from the SDK, against one full-model server. */
suspend fun obfuscated(model: String, server: ServerConfig) {
    val config = Veil.config(
        model, listOf(server), policy = Policy.OBFUSCATED, steps = 4,
        obfuscation = Veil.obfuscation(serverSteps = 2, kMax = 4),
    )
    Veil.create(config).use { veil ->
        check(veil.policy == Policy.OBFUSCATED) { "policy ${veil.policy}" }
        val image = veil.generate("a portrait of a young woman smiling", Veil.options(seed = 3L))
        val o = image.privacy.obfuscation ?: throw AssertionError("no obfuscation summary")
        check(o.candidates in 2u..4u && o.serverSteps == 2u && o.deviceSteps == 2u) { "summary $o" }
        check(o.spans.any { it.category == "gender" } && o.spans.any { it.category == "age" }) { "spans ${o.spans}" }
        val seen = image.privacy.servers.single()
        // The K candidates, and the (empty) negative prompt of the unconditional branch.
        check(seen.prompts.filter { it.isNotEmpty() }.size.toUInt() == o.candidates && seen.receivedText) { "server saw ${seen.prompts}" }
        check(seen.prompts.contains("a portrait of a young woman smiling")) { "the real prompt is one of the candidates" }
        check(image.png.isNotEmpty() && image.size.first > 0) { "no image" }
    }
}
