// The idiomatic Kotlin face of Veil over the generated bindings (dev.veil.ffi). Plain Kotlin +
// kotlinx.coroutines, no Android API: the same file ships in the AAR and is compiled and run on
// the JVM by CI (android/jvm-test).
package dev.veil

import dev.veil.ffi.CancelHandle
import dev.veil.ffi.GeneratedImage
import dev.veil.ffi.GenerationDefaults
import dev.veil.ffi.GenerationOptions
import dev.veil.ffi.ProgressListener
import dev.veil.ffi.ServerConfig
import dev.veil.ffi.VeilClient
import dev.veil.ffi.VeilConfig
import dev.veil.ffi.LogLevel
import dev.veil.ffi.LogSink
import dev.veil.ffi.parseServerList
import dev.veil.ffi.setLogSink
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.channels.trySendBlocking
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.channelFlow
import kotlinx.coroutines.withContext

/** Where a generation is: [step] of [total] denoising steps done. */
data class Progress(val step: Int, val total: Int) {
    val fraction: Float get() = if (total == 0) 0f else step.toFloat() / total
}

/** What [Veil.generateFlow] emits: progress after every step, then the image. */
sealed interface GenerationEvent {
    data class Step(val progress: Progress) : GenerationEvent
    data class Finished(val image: GeneratedImage) : GenerationEvent
}

/**
 * A Veil client: the model is loaded once by [create]; [generate] may then run any number of
 * times, concurrently too. Failures are [dev.veil.ffi.VeilException] subclasses (InvalidConfig,
 * ModelLoad, AuthFailed, CertificateMismatch, Cancelled, …); `e.describe()` is a sentence for the
 * user and `e.isRetryable()` says whether trying again may help.
 */
class Veil private constructor(private val client: VeilClient) : AutoCloseable {
    companion object {
        /** Validates [config] and loads the model on [Dispatchers.IO]. */
        suspend fun create(config: VeilConfig): Veil =
            withContext(Dispatchers.IO) { Veil(VeilClient(config)) }

        /**
         * The servers of a server list: `servers.toml` text (the format `veil --server-list`
         * reads; JSON of the same schema too). Throws [dev.veil.ffi.VeilException.InvalidConfig].
         */
        fun servers(serversToml: String): List<ServerConfig> = parseServerList(serversToml)

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

        /** A config with the recommended settings (strict placement, f32 wire). */
        fun config(
            modelDir: String,
            servers: List<ServerConfig>,
            policy: String = "strict",
            defaults: GenerationDefaults = GenerationDefaults(),
        ): VeilConfig = VeilConfig(modelDir = modelDir, servers = servers, policy = policy, defaults = defaults)
    }

    /** The placement policy in use. */
    val policy: String get() = client.policy()

    /**
     * Generates one image. [onProgress] runs after every step on a Veil thread (post to your UI
     * thread yourself). Cancelling the calling coroutine, or [cancel] when given, stops the
     * generation before its next step: the coroutine way throws [CancellationException], the
     * handle way [dev.veil.ffi.VeilException.Cancelled].
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
                override fun onProgress(step: UInt, total: UInt) = callback(Progress(step.toInt(), total.toInt()))
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
