// The Veil demo: a prompt, the shard server list, progress, the image.
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
import dev.veil.ffi.ServerConfig
import dev.veil.ffi.VeilException
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
    var job by mutableStateOf<Job?>(null)

    fun generate(modelDir: File, prepare: () -> Unit) {
        job = viewModelScope.launch {
            try {
                val veil = client(modelDir, Veil.servers(servers), prepare)
                status = "Generating…"
                val result = veil.generate(prompt) { p -> progress = p.fraction }
                image = withContext(Dispatchers.Default) {
                    BitmapFactory.decodeByteArray(result.png, 0, result.png.size).asImageBitmap()
                }
                status = "Done in %.1f s, seed %d".format(result.stats.wallSeconds, result.seed.toLong())
            } catch (e: VeilException) {
                status = e.describe() + if (e.isRetryable()) " (try again)" else ""
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
        val veil = Veil.create(Veil.config(modelDir.path, list))
        loaded = list to veil
        return veil
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
    }
}
