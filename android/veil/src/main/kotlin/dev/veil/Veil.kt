// The idiomatic Kotlin face of Veil over the generated bindings (dev.veil.ffi). Plain Kotlin +
// kotlinx.coroutines, no Android API: the same file ships in the AAR and is compiled and run on
// the JVM by CI (android/jvm-test).
package dev.veil

import dev.veil.core.Device
import dev.veil.core.GeneratedImage
import dev.veil.core.GenerationDefaults
import dev.veil.core.GenerationOptions
import dev.veil.core.LoraConfig
import dev.veil.core.ObfuscationConfig
import dev.veil.core.Policy
import dev.veil.core.StepPreview
import dev.veil.core.ProgressListener
import dev.veil.core.Scheduler
import dev.veil.core.ServerConfig
import dev.veil.core.VeilConfig
import dev.veil.core.WireCodec
import dev.veil.core.WireFormat
import dev.veil.ffi.CancelHandle
import dev.veil.ffi.VeilClient
import dev.veil.ffi.LogLevel
import dev.veil.ffi.LogSink
import dev.veil.ffi.parseServerList
import dev.veil.ffi.readServerList
import dev.veil.ffi.setLogSink
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.channels.trySendBlocking
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.channelFlow
import kotlinx.coroutines.withContext

/**
 * Where a generation is: [step] of [total] denoising steps done, with a [preview] (a PNG of the
 * latents projected to RGB, 1/8 of the image's size) on the steps
 * [Veil.options]`(previewEverySteps = N)` asks for.
 */
data class Progress(val step: Int, val total: Int, val preview: StepPreview? = null) {
    val fraction: Float get() = if (total == 0) 0f else step.toFloat() / total
}

/** The preview's size in pixels. */
val StepPreview.size: Pair<Int, Int> get() = width.toInt() to height.toInt()

/** The image's size in pixels. */
val GeneratedImage.size: Pair<Int, Int> get() = width.toInt() to height.toInt()

/** The seed the image was made with, as a Kotlin Long (pass it back to reproduce it). */
val GeneratedImage.seedLong: Long get() = seed.toLong()

private fun nonNegative(name: String, v: Int?): UInt? {
    require(v == null || v >= 0) { "$name must be ≥ 0, got $v" }
    return v?.toUInt()
}

/** What [Veil.generateFlow] emits: progress after every step, then the image. */
sealed interface GenerationEvent {
    data class Step(val progress: Progress) : GenerationEvent
    data class Finished(val image: GeneratedImage) : GenerationEvent
}

/**
 * A Veil client: the model is loaded once by [create]; [generate] may then run any number of
 * times, concurrently too. Failures are [dev.veil.core.VeilException] subclasses (InvalidConfig,
 * ModelLoad, AuthFailed, CertificateMismatch, Cancelled, …); `e.message` is a sentence for the
 * user and `e.isRetryable()` says whether trying again may help. The result's `privacy` says
 * what each server received.
 */
class Veil private constructor(private val client: VeilClient) : AutoCloseable {
    companion object {
        /** Validates [config] and loads the model on [Dispatchers.IO]. */
        suspend fun create(config: VeilConfig): Veil =
            withContext(Dispatchers.IO) { Veil(VeilClient(config)) }

        /**
         * The servers of a server list: `servers.toml` text (the format `veil --server-list`
         * reads; JSON of the same schema too). Throws [dev.veil.core.VeilException.InvalidConfig].
         */
        fun servers(serversToml: String): List<ServerConfig> = parseServerList(serversToml)

        /** The servers of a `servers.toml` (or JSON) file; a relative `token_file` is resolved against its folder. */
        fun serversFromFile(path: String): List<ServerConfig> = readServerList(path)

        /**
         * Forwards Veil's log lines at [level] and above to [onLog] (from Veil's threads; null:
         * stop). Returns false when the process already had another tracing subscriber.
         */
        fun setLogger(level: LogLevel = LogLevel.WARN, onLog: ((LogLevel, String, String) -> Unit)?): Boolean =
            setLogSink(
                onLog?.let { f ->
                    object : LogSink {
                        override fun log(level: LogLevel, target: String, message: String) = f(level, target, message)
                    }
                },
                level,
            )

        /**
         * A config with the recommended settings: [Policy.STRICT], f32 on the wire, no lossy
         * codec. [Policy.PPIDM] is research only and needs `allowResearchPolicies = true`.
         */
        fun config(
            modelDir: String,
            servers: List<ServerConfig>,
            policy: Policy = Policy.STRICT,
            steps: Int = 30,
            guidance: Double = 5.0,
            scheduler: Scheduler = Scheduler.DDIM,
            width: Int? = null,
            height: Int? = null,
            wire: WireFormat = WireFormat.F32,
            codec: WireCodec = WireCodec.EXACT,
            device: Device = Device.AUTO,
            obfuscation: ObfuscationConfig = obfuscation(),
            obfuscationKeyFile: String? = null,
            allowResearchPolicies: Boolean = false,
            lora: List<LoraConfig> = emptyList(),
        ): VeilConfig = VeilConfig(
            modelDir = modelDir,
            servers = servers,
            policy = policy,
            allowResearchPolicies = allowResearchPolicies,
            wire = wire,
            codec = codec,
            defaults = GenerationDefaults(
                steps = nonNegative("steps", steps)!!,
                guidance = guidance,
                width = nonNegative("width", width),
                height = nonNegative("height", height),
                scheduler = scheduler,
            ),
            obfuscationKeyFile = obfuscationKeyFile,
            obfuscation = obfuscation,
            device = device,
            lora = lora,
        )

        /**
         * The `obfuscated` policy's settings: [serverSteps] (k; null: half the steps), [kMax]
         * candidate prompts at most, an optional device U-Net folder for the late steps, extra
         * attribute lexicons (TOML/JSON files) and whether the built-in one is used.
         */
        fun obfuscation(
            serverSteps: Int? = null,
            kMax: Int = 8,
            deviceModelDir: String? = null,
            lexiconFiles: List<String> = emptyList(),
            builtinLexicon: Boolean = true,
        ): ObfuscationConfig = ObfuscationConfig(
            serverSteps = nonNegative("serverSteps", serverSteps),
            kMax = nonNegative("kMax", kMax)!!,
            deviceModelDir = deviceModelDir,
            lexiconFiles = lexiconFiles,
            builtinLexicon = builtinLexicon,
        )

        /**
         * Per-call options in Kotlin numbers; every null takes the client's default (a null seed:
         * a random one). Image-to-image: [initImage] (PNG/JPEG bytes, its size is the image's) and
         * [strength] in (0, 1] (null: 0.8).
         */
        fun options(
            steps: Int? = null,
            seed: Long? = null,
            guidance: Double? = null,
            width: Int? = null,
            height: Int? = null,
            scheduler: Scheduler? = null,
            negativePrompt: String? = null,
            previewEverySteps: Int? = null,
            reuseAttentionFrom: Int? = null,
            initImage: ByteArray? = null,
            strength: Double? = null,
            mask: ByteArray? = null,
        ): GenerationOptions = GenerationOptions(
            negativePrompt = negativePrompt,
            steps = nonNegative("steps", steps),
            guidance = guidance,
            seed = seed?.toULong(),
            width = nonNegative("width", width),
            height = nonNegative("height", height),
            scheduler = scheduler,
            reuseAttentionFrom = nonNegative("reuseAttentionFrom", reuseAttentionFrom),
            previewEverySteps = nonNegative("previewEverySteps", previewEverySteps),
            initImage = initImage,
            strength = strength,
            mask = mask,
        )
    }

    /** The placement policy in use. */
    val policy: Policy get() = client.policy()

    /**
     * Generates one image. [onProgress] runs after every step on a Veil thread (post to your UI
     * thread yourself). Cancelling the calling coroutine, or [cancel] when given, stops the
     * generation before its next step: the coroutine way throws [CancellationException], the
     * handle way [dev.veil.core.VeilException.Cancelled].
     */
    suspend fun generate(
        prompt: String,
        options: GenerationOptions = GenerationOptions(),
        cancel: CancelHandle? = null,
        onProgress: ((Progress) -> Unit)? = null,
    ): GeneratedImage {
        val handle = cancel ?: CancelHandle()
        val listener = onProgress?.let { callback ->
            object : ProgressListener {
                override fun onProgress(step: UInt, total: UInt, preview: StepPreview?) =
                    callback(Progress(step.toInt(), total.toInt(), preview))
            }
        }
        try {
            return client.generate(prompt, options, listener, handle)
        } catch (e: CancellationException) {
            // The coroutine went away: stop the Rust side too (it does not see coroutines).
            handle.cancel()
            throw e
        } finally {
            if (cancel == null) handle.close()
        }
    }

    /**
     * [generate] as a cold Flow: a [GenerationEvent.Step] per step, then
     * [GenerationEvent.Finished]. Every step is delivered: a slow collector makes the generation
     * thread wait (the step event is sent with back-pressure from that thread, never dropped).
     */
    fun generateFlow(prompt: String, options: GenerationOptions = GenerationOptions()): Flow<GenerationEvent> =
        channelFlow {
            val image = generate(prompt, options) { trySendBlocking(GenerationEvent.Step(it)) }
            send(GenerationEvent.Finished(image))
        }

    override fun close() = client.close()
}
