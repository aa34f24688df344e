import SwiftUI
import Veil

/// One row of the server list, editable in the UI.
struct ServerRow: Identifiable, Hashable {
    let id = UUID()
    var address = ""
    var fingerprint = ""
    var token = ""
}

@MainActor
final class DemoModel: ObservableObject {
    @Published var prompt = "a small red circle at the top left on a white background"
    @Published var servers: [ServerRow] = [ServerRow(), ServerRow()]
    @Published var progress: Double = 0
    @Published var image: UIImage?
    @Published var status = "Ready"
    /// One line per server: what it received (the result's privacy report).
    @Published var seen: [String] = []
    @Published var running: RunningGeneration?

    private var veil: Veil?
    private var veilServers: [ServerRow] = []

    private func client() async throws -> Veil {
        if let veil, veilServers == servers { return veil }
        guard let model = Bundle.main.url(forResource: "model", withExtension: nil) else {
            throw VeilError.ModelLoad(detail: "bundle a diffusers model folder named `model`")
        }
        let config = VeilConfig.recommended(
            modelDir: model.path,
            servers: servers.map { ServerConfig(address: $0.address, fingerprint: $0.fingerprint, token: $0.token) },
            policy: .strict
        )
        let made = try await Veil(config: config)
        veil = made
        veilServers = servers
        return made
    }

    func generate() async {
        image = nil
        progress = 0
        status = "Loading…"
        do {
            let run = try await client().start(prompt: prompt, options: .with(previewEverySteps: 5))
            running = run
            status = "Generating…"
            for await p in run.progress {
                progress = p.fraction
                if let preview = p.preview { image = UIImage(data: preview.png) }
            }
            let result = try await run.image.value
            image = UIImage(data: result.png)
            seen = result.privacy.servers.map(describe)
            let sent = result.stats.perServer.map(\.wireBytesSent).reduce(0, +)
            status = String(format: "Done in %.1f s, %.1f MB sent, seed %llu",
                            result.stats.wallSeconds, Double(sent) / 1e6, result.seed)
        } catch VeilError.Cancelled {
            status = "Cancelled"
        } catch {
            status = error.localizedDescription
        }
        running = nil
    }

    func cancel() {
        running?.cancel()
    }

    /// "server 0: 0.31 MB, rows 0..5 of 8x8, prompt-dependent 0.30 MB, no text tokens".
    private func describe(_ v: ServerView) -> String {
        let rows = v.rows.map { r in
            let got = r.received.map { "\($0.start)..\($0.end)" }.joined(separator: ",")
            return "\(got) of \(r.height)x\(r.width)"
        }.joined(separator: "; ")
        return String(format: "server %u: %.2f MB, prompt-dependent %.2f MB, text tokens %llu B, prompts %d; rows %@",
                      v.server, Double(v.bytes) / 1e6, Double(v.textBytes) / 1e6, v.textIndexedBytes,
                      v.prompts.count, rows)
    }
}

struct ContentView: View {
    @StateObject private var model = DemoModel()

    var body: some View {
        NavigationStack {
            Form {
                Section("Prompt (stays on this phone)") {
                    TextField("Prompt", text: $model.prompt, axis: .vertical)
                }
                Section("Shard servers, in strip order") {
                    ForEach($model.servers) { $row in
                        VStack(alignment: .leading) {
                            TextField("host:port", text: $row.address)
                            TextField("sha256:…", text: $row.fingerprint).font(.caption.monospaced())
                            SecureField("token", text: $row.token)
                        }
                    }
                    .onDelete { model.servers.remove(atOffsets: $0) }
                    Button("Add server") { model.servers.append(ServerRow()) }
                }
                Section {
                    if model.running == nil {
                        Button("Generate") { Task { await model.generate() } }
                    } else {
                        ProgressView(value: model.progress)
                        Button("Cancel", role: .destructive) { model.cancel() }
                    }
                    Text(model.status).font(.footnote)
                }
                if let image = model.image {
                    Section("Image") {
                        Image(uiImage: image).resizable().interpolation(.none).scaledToFit()
                    }
                }
                if !model.seen.isEmpty {
                    Section("What each server saw") {
                        ForEach(model.seen, id: \.self) { Text($0).font(.caption.monospaced()) }
                    }
                }
            }
            .navigationTitle("Veil")
        }
    }
}
