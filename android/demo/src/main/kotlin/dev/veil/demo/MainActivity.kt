// The Veil demo: a prompt, the shard server list, progress with previews, the image, and what
// each server saw (the result's privacy report).
package dev.veil.demo

import android.graphics.BitmapFactory
import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.setContent
import androidx.compose.foundation.Image
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.rememberScrollState
import androidx.compose.foundation.verticalScroll
import androidx.compose.material3.Button
import androidx.compose.material3.LinearProgressIndicator
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Text
import androidx.compose.runtime.Composable
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.setValue
import androidx.compose.ui.Modifier
import androidx.compose.ui.graphics.ImageBitmap
import androidx.compose.ui.graphics.asImageBitmap
import androidx.compose.ui.unit.dp
import androidx.lifecycle.ViewModel
import androidx.lifecycle.viewModelScope
import androidx.lifecycle.viewmodel.compose.viewModel
import dev.veil.Veil
import dev.veil.core.Policy
import dev.veil.core.ServerConfig
import dev.veil.core.ServerView
import dev.veil.core.VeilException
import dev.veil.seedLong
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.Job
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import java.io.File

class DemoViewModel : ViewModel() {
    var prompt by mutableStateOf("a small red circle at the top left on a white background")
    /** The shard servers as `servers.toml` text, the format `veil --server-list` reads. */
    var servers by mutableStateOf(
        "[[server]]\naddress = \"10.0.2.2:4433\"\nfingerprint = \"sha256:…\"\ntoken = \"…\"\n"
    )
    var progress by mutableStateOf(0f)
    var status by mutableStateOf("Ready")
    var image by mutableStateOf<ImageBitmap?>(null)
    /** One line per server: what it received. */
    var seen by mutableStateOf<List<String>>(emptyList())
    var job by mutableStateOf<Job?>(null)

    private suspend fun decode(png: ByteArray): ImageBitmap = withContext(Dispatchers.Default) {
        BitmapFactory.decodeByteArray(png, 0, png.size).asImageBitmap()
    }

    fun generate(modelDir: File, prepare: () -> Unit) {
        job = viewModelScope.launch {
            try {
                val veil = client(modelDir, Veil.servers(servers), prepare)
                status = "Generating…"
                val result = veil.generate(prompt, Veil.options(previewEverySteps = 5)) { p ->
                    progress = p.fraction
                    p.preview?.let { preview -> viewModelScope.launch { image = decode(preview.png) } }
                }
                image = decode(result.png)
                seen = result.privacy.servers.map(::describe)
                status = "Done in %.1f s, seed %d".format(result.stats.wallSeconds, result.seedLong)
            } catch (e: VeilException) {
                status = e.message + if (e.isRetryable()) " (try again)" else ""
            } finally {
                job = null
            }
        }
    }

    /** The model is loaded once and kept while the server list stays the same. */
    private var loaded: Pair<List<ServerConfig>, Veil>? = null

    private suspend fun client(modelDir: File, list: List<ServerConfig>, prepare: () -> Unit): Veil {
        loaded?.let { (servers, veil) -> if (servers == list) return veil }
        loaded?.second?.close()
        loaded = null
        status = "Loading the model…"
        withContext(Dispatchers.IO) { prepare() }
        val veil = Veil.create(Veil.config(modelDir.path, list, policy = Policy.STRICT))
        loaded = list to veil
        return veil
    }

    /** "server 0: 0.31 MB, prompt-dependent 0.30 MB, text tokens 0 B, prompts 0; rows 0..5 of 8x8". */
    private fun describe(v: ServerView): String {
        val rows = v.rows.joinToString("; ") { r ->
            r.received.joinToString(",") { "${it.start}..${it.end}" } + " of ${r.height}x${r.width}"
        }
        return "server %d: %.2f MB, prompt-dependent %.2f MB, text tokens %d B, prompts %d; rows %s".format(
            v.server.toInt(), v.bytes.toDouble() / 1e6, v.textBytes.toDouble() / 1e6,
            v.textIndexedBytes.toLong(), v.prompts.size, rows,
        )
    }

    override fun onCleared() {
        loaded?.second?.close()
    }

    /** Cancelling the coroutine cancels the Rust generation before its next step. */
    fun cancel() {
        job?.cancel()
        status = "Cancelled"
    }
}

class MainActivity : ComponentActivity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val modelDir = File(filesDir, "model")
        setContent { MaterialTheme { DemoScreen(modelDir) { copyModel(modelDir) } } }
    }

    /** assets/model → files/model, once (Veil memory-maps weights from a real folder). */
    private fun copyModel(target: File) {
        if (File(target, "model_index.json").exists()) return
        fun copy(path: String, to: File) {
            val children = assets.list(path).orEmpty()
            if (children.isEmpty()) {
                to.parentFile?.mkdirs()
                assets.open(path).use { input -> to.outputStream().use { input.copyTo(it) } }
            } else {
                children.forEach { copy("$path/$it", File(to, it)) }
            }
        }
        copy("model", target)
    }
}

@Composable
fun DemoScreen(modelDir: File, prepare: () -> Unit, vm: DemoViewModel = viewModel()) {
    Column(Modifier.padding(16.dp).verticalScroll(rememberScrollState())) {
        OutlinedTextField(vm.prompt, { vm.prompt = it }, Modifier.fillMaxWidth(), label = { Text("Prompt (stays on this phone)") })
        OutlinedTextField(vm.servers, { vm.servers = it }, Modifier.fillMaxWidth(), minLines = 2,
            label = { Text("Servers (servers.toml)") })
        if (vm.job == null) {
            Button({ vm.generate(modelDir, prepare) }) { Text("Generate") }
        } else {
            LinearProgressIndicator(progress = { vm.progress }, modifier = Modifier.fillMaxWidth())
            Button({ vm.cancel() }) { Text("Cancel") }
        }
        Text(vm.status, style = MaterialTheme.typography.bodySmall)
        vm.image?.let { Image(it, contentDescription = vm.prompt, modifier = Modifier.fillMaxWidth()) }
        if (vm.seen.isNotEmpty()) Text("What each server saw", style = MaterialTheme.typography.titleSmall)
        vm.seen.forEach { Text(it, style = MaterialTheme.typography.bodySmall) }
    }
}
