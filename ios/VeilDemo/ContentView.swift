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
    @Published var running: RunningGeneration?

    private var veil: Veil?
    private var veilServers: [ServerRow] = []

    private func client() async throws -> Veil {
        if let veil, veilServers == servers { return veil }
        guard let model = Bundle.main.url(forResource: "model", withExtension: nil) else {
            throw VeilError.ModelLoad(detail: "bundle a diffusers model folder named `model`")
        }
        let config = VeilConfig(
            modelDir: model.path,
            servers: servers.map { ServerConfig(address: $0.address, fingerprint: $0.fingerprint, token: $0.token) },
            policy: "strict"
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
            let run = try await client().start(prompt: prompt)
            running = run
            status = "Generating…"
            for await p in run.progress {
                progress = p.fraction
            }
            let result = try await run.image.value
            image = UIImage(data: result.png)
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
            }
            .navigationTitle("Veil")
        }
    }
}
