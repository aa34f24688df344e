// The idiomatic Swift face of Veil over the generated bindings (module VeilFFI):
// `try await veil.generate(prompt:)`, progress as a closure or an AsyncStream, and Swift task
// cancellation wired to Veil's cancel handle (Task.cancel() does not reach Rust by itself).
import Foundation
@_exported import VeilFFI

/// Where a generation is: `step` of `total` denoising steps done.
public struct GenerationProgress: Sendable, Equatable {
    public let step: Int
    public let total: Int
    public var fraction: Double { total == 0 ? 0 : Double(step) / Double(total) }
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
/// concurrently too. Errors are `VeilError` (InvalidConfig, ModelLoad, AuthFailed, …).
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
    public var policy: String { client.policy() }

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
    /// run.progress { … }`, then `try await run.image.value`).
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

    func onProgress(step: UInt32, total: UInt32) {
        callback(GenerationProgress(step: Int(step), total: Int(total)))
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
