// The idiomatic Swift face of Veil over the generated bindings (module VeilFFI):
// `try await veil.generate(prompt:)`, progress as a closure or an AsyncStream, and Swift task
// cancellation wired to Veil's cancel handle (Task.cancel() does not reach Rust by itself).
import Foundation
@_exported import VeilFFI

/// Where a generation is: `step` of `total` denoising steps done, with a `preview` (a PNG of
/// the latents projected to RGB, 1/8 of the image's size) on the steps
/// `GenerationOptions.previewEverySteps` asks for.
public struct GenerationProgress: Sendable, Equatable {
    public let step: Int
    public let total: Int
    public let preview: StepPreview?
    public var fraction: Double { total == 0 ? 0 : Double(step) / Double(total) }
}

extension VeilConfig {
    /// The recommended settings: `.strict`, f32 on the wire, no lossy codec, in Swift `Int`s.
    /// `.ppidm` is research only and needs `allowResearchPolicies: true`.
    public static func recommended(
        modelDir: String,
        servers: [ServerConfig],
        policy: Policy = .strict,
        steps: Int = 30,
        guidance: Double = 5.0,
        scheduler: Scheduler = .ddim,
        device: Device = .auto,
        obfuscation: ObfuscationConfig = ObfuscationConfig(),
        obfuscationKeyFile: String? = nil,
        allowResearchPolicies: Bool = false,
        lora: [LoraConfig] = []
    ) -> VeilConfig {
        VeilConfig(
            modelDir: modelDir,
            servers: servers,
            policy: policy,
            allowResearchPolicies: allowResearchPolicies,
            wire: .f32,
            codec: .exact,
            defaults: GenerationDefaults(steps: UInt32(clamping: steps), guidance: guidance, scheduler: scheduler),
            obfuscationKeyFile: obfuscationKeyFile,
            obfuscation: obfuscation,
            device: device,
            lora: lora
        )
    }
}

extension GenerationOptions {
    /// Per-call options in Swift `Int`s; every nil takes the client's default (a nil seed: a
    /// random one). Image-to-image: `initImage` (PNG/JPEG data, its size is the image's) and
    /// `strength` in (0, 1] (nil: 0.8); inpainting (a model with an inpainting U-Net) adds
    /// `mask` (PNG data, white where the image is repainted).
    public static func with(
        steps: Int? = nil,
        seed: UInt64? = nil,
        guidance: Double? = nil,
        scheduler: Scheduler? = nil,
        negativePrompt: String? = nil,
        previewEverySteps: Int? = nil,
        initImage: Data? = nil,
        strength: Double? = nil,
        mask: Data? = nil
    ) -> GenerationOptions {
        GenerationOptions(
            negativePrompt: negativePrompt,
            steps: steps.map { UInt32(clamping: $0) },
            guidance: guidance,
            seed: seed,
            scheduler: scheduler,
            previewEverySteps: previewEverySteps.map { UInt32(clamping: $0) },
            initImage: initImage,
            strength: strength,
            mask: mask
        )
    }
}

/// A generation started with `Veil.start(prompt:options:)`: progress as an AsyncStream, the
/// image as a task.
public struct RunningGeneration: Sendable {
    public let progress: AsyncStream<GenerationProgress>
    public let image: Task<GeneratedImage, Error>
    private let handle: CancelHandle

    init(progress: AsyncStream<GenerationProgress>, image: Task<GeneratedImage, Error>, handle: CancelHandle) {
        self.progress = progress
        self.image = image
        self.handle = handle
    }

    /// Stops before the next step; `image` then throws `VeilError.Cancelled`.
    public func cancel() {
        handle.cancel()
    }
}

/// The Veil client: the model is loaded once; `generate` may run any number of times,
/// concurrently too. Errors are `VeilError` (InvalidConfig, ModelLoad, AuthFailed, …). The
/// image's `privacy` says what each server received.
public final class Veil: Sendable {
    private let client: VeilClient

    /// Validates `config` and loads the model, off the caller's actor.
    public init(config: VeilConfig) async throws {
        client = try await Task.detached(priority: .userInitiated) {
            try VeilClient(config: config)
        }.value
    }

    /// The servers of a server list: `servers.toml` text (the format `veil --server-list`
    /// reads; JSON of the same schema too). Throws `VeilError.InvalidConfig`.
    public static func servers(toml: String) throws -> [ServerConfig] {
        try parseServerList(text: toml)
    }

    /// The servers of a server-list file (relative `token_file`s from its folder).
    public static func servers(file: URL) throws -> [ServerConfig] {
        try readServerList(path: file.path)
    }

    /// Forwards Veil's log lines at `level` and above to `onLog` (called from Veil's threads;
    /// nil: stop). Returns false when the process already had another tracing subscriber.
    @discardableResult
    public static func setLogger(
        level: LogLevel = .warn,
        _ onLog: (@Sendable (LogLevel, String, String) -> Void)?
    ) -> Bool {
        setLogSink(sinkTo: onLog.map { ClosureLogSink($0) }, level: level)
    }

    /// The placement policy in use.
    public var policy: Policy { client.policy() }

    /// Generates one image. `onProgress` runs after every step on a Veil thread. Cancelling the
    /// calling task, or `cancel` when given, stops the generation before its next step with
    /// `VeilError.Cancelled`.
    public func generate(
        prompt: String,
        options: GenerationOptions = GenerationOptions(),
        cancel: CancelHandle? = nil,
        onProgress: (@Sendable (GenerationProgress) -> Void)? = nil
    ) async throws -> GeneratedImage {
        let handle = cancel ?? CancelHandle()
        let listener: ProgressListener? = onProgress.map { ClosureListener($0) }
        return try await withTaskCancellationHandler {
            try await client.generate(prompt: prompt, options: options, listener: listener, cancel: handle)
        } onCancel: {
            handle.cancel()
        }
    }

    /// Starts a generation whose progress is an AsyncStream (for SwiftUI: `for await p in
    /// run.progress { … }`, then `try await run.image.value`). The stream keeps the newest
    /// step only: a UI shows where the run is now.
    public func start(prompt: String, options: GenerationOptions = GenerationOptions()) -> RunningGeneration {
        let handle = CancelHandle()
        let (stream, continuation) = AsyncStream<GenerationProgress>.makeStream(bufferingPolicy: .bufferingNewest(1))
        let task = Task { [client] () async throws -> GeneratedImage in
            defer { continuation.finish() }
            let listener = ClosureListener { continuation.yield($0) }
            return try await withTaskCancellationHandler {
                try await client.generate(prompt: prompt, options: options, listener: listener, cancel: handle)
            } onCancel: {
                handle.cancel()
            }
        }
        return RunningGeneration(progress: stream, image: task, handle: handle)
    }
}

/// Adapts a closure to the generated `ProgressListener` protocol.
private final class ClosureListener: ProgressListener, @unchecked Sendable {
    private let callback: @Sendable (GenerationProgress) -> Void

    init(_ callback: @escaping @Sendable (GenerationProgress) -> Void) {
        self.callback = callback
    }

    func onProgress(step: UInt32, total: UInt32, preview: StepPreview?) {
        callback(GenerationProgress(step: Int(step), total: Int(total), preview: preview))
    }
}

/// Adapts a closure to the generated `LogSink` protocol.
private final class ClosureLogSink: LogSink, @unchecked Sendable {
    private let callback: @Sendable (LogLevel, String, String) -> Void

    init(_ callback: @escaping @Sendable (LogLevel, String, String) -> Void) {
        self.callback = callback
    }

    func log(level: LogLevel, target: String, message: String) {
        callback(level, target, message)
    }
}

/// Readable errors: `error.localizedDescription` is the sentence Rust gives (`describe()`), and
/// `isRetryable()` says whether trying again may help.
extension VeilError: LocalizedError {
    public var errorDescription: String? { describe() }
}
