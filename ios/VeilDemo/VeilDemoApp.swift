// The Veil demo app: type a prompt, list your shard servers, watch the steps, see the image.
// Add this folder and the Veil package to an iOS App target in Xcode (see ios/README.md);
// bundle a diffusers model folder named `model` as a folder reference.
import SwiftUI

@main
struct VeilDemoApp: App {
    var body: some Scene {
        WindowGroup {
            ContentView()
        }
    }
}
