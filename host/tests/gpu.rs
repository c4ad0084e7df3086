//! GPUs for Python functions on a machine without one: `lode serve --gpu-root` points at a
//! root the test makes, with the driver's listing, device nodes (major 195, as NVIDIA's; no
//! driver answers behind them), a fake `nvidia-smi` and a fake `libcuda`. Checked from inside
//! the containers: exactly their devices, openable; the driver's files read-only; the
//! variables; devices held until a container stops, so a call waits for them.

mod harness;

use std::ffi::CString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use harness::{BASE_DIR, Lode, repo_file, text};

fn node(path: &Path, minor: u32) {
    let name = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path; mknod(2) takes plain integers otherwise.
    let made = unsafe {
        libc::mknod(
            name.as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(195, minor),
        )
    };
    assert_eq!(
        made,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// What `/metrics` says now.
fn metrics(lode: &Lode) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let response = lode
            .api(reqwest::Method::GET, "/metrics")
            .send()
            .await
            .unwrap();
        response.text().await.unwrap()
    })
}

/// `count` H100s (at most two) as the driver lists them, their nodes and the control nodes,
/// `nvidia-smi` and `libcuda`.
fn gpu_root(root: &Path, count: usize) {
    for (bus, minor) in [("0000:01:00.0", 0), ("0000:02:00.0", 1)]
        .into_iter()
        .take(count)
    {
        let dir = root.join("proc/driver/nvidia/gpus").join(bus);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("information"),
            format!("Model: \t\t NVIDIA H100 80GB HBM3\nIRQ: \t\t 42\nDevice Minor: \t {minor}\n"),
        )
        .unwrap();
    }
    std::fs::create_dir_all(root.join("dev")).unwrap();
    for (name, minor) in [
        ("nvidia0", 0),
        ("nvidia1", 1),
        ("nvidiactl", 255),
        ("nvidia-uvm", 250),
    ] {
        node(&root.join("dev").join(name), minor);
    }
    let bin = root.join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        bin.join("nvidia-smi"),
        "#!/bin/sh\necho \"fake nvidia-smi sees $(ls /dev | grep -c '^nvidia[0-9]') GPU(s)\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("nvidia-smi"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let lib = root.join("usr/lib/x86_64-linux-gnu");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::write(lib.join("libcuda.so.1"), "fake libcuda\n").unwrap();
}

fn call(lode: &Lode, target: &str, args: &[&str]) -> Value {
    let mut all = vec!["call", target];
    all.extend_from_slice(args);
    serde_json::from_str(&lode.cli_ok(&all)).unwrap()
}

#[test]
fn python_functions_get_exactly_their_gpus_and_wait_for_busy_ones() {
    let root = tempfile::tempdir().unwrap();
    gpu_root(root.path(), 2);
    let lode = Lode::start(&[
        "--image-base-dir",
        BASE_DIR,
        "--gpu-root",
        root.path().to_str().unwrap(),
    ]);
    let deployed = lode.cli_ok(&["deploy", &repo_file("host/tests/python/gpu.py")]);
    assert!(deployed.contains("deployed gpu-app"), "{deployed}");

    let seen = call(&lode, "gpu-app/inspect", &[]);
    assert_eq!(
        seen["nodes"],
        serde_json::json!(["nvidia-uvm", "nvidia0", "nvidiactl"]),
        "{seen}"
    );
    for (node, answer) in seen["open"].as_object().unwrap() {
        assert_eq!(answer, "No such device or address", "{node}: {seen}");
    }
    assert_eq!(seen["visible"], serde_json::json!(["0", "0"]), "{seen}");
    assert_eq!(seen["other"], "Operation not permitted", "{seen}");
    assert_eq!(seen["smi"], "fake nvidia-smi sees 1 GPU(s)", "{seen}");
    assert_eq!(seen["lib"], "fake libcuda");
    assert_eq!(seen["lib_writable"], false);
    assert_eq!(call(&lode, "gpu-app/plain", &[]), serde_json::json!([]));

    // Both GPUs held by one container: a call that needs one waits until it stops.
    let started = Instant::now();
    let holding = lode
        .cli_command(&["call", "gpu-app/hold", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stats = harness::wait_for(Duration::from_secs(30), || {
        let stats = lode.cli_ok(&["stats", "gpu-app"]);
        stats
            .lines()
            .any(|l| l.starts_with("hold") && l.split_whitespace().last() == Some("2"))
            .then_some(stats)
    });
    assert!(
        stats.is_some(),
        "the holding container never showed 2 GPUs:\n{}",
        lode.cli_ok(&["stats", "gpu-app"])
    );
    let metrics = metrics(&lode);
    assert!(
        metrics.lines().any(|l| l.starts_with("lode_function_gpus{")
            && l.contains("function=\"hold\"")
            && l.ends_with(" 2")),
        "{metrics}"
    );
    let waited = call(&lode, "gpu-app/inspect", &[]);
    let held: Value =
        serde_json::from_str(&text(&holding.wait_with_output().unwrap().stdout)).unwrap();
    assert_eq!(
        held["nodes"],
        serde_json::json!(["nvidia-uvm", "nvidia0", "nvidia1", "nvidiactl"])
    );
    assert!(
        waited["done"].as_f64().unwrap() > held["done"].as_f64().unwrap(),
        "inspect ran while hold had both GPUs: {waited} {held}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));

    // A GPU the host lacks is refused at deploy, naming what it has.
    let work = tempfile::tempdir().unwrap();
    let other = work.path().join("a100.py");
    std::fs::write(
        &other,
        std::fs::read_to_string(repo_file("host/tests/python/gpu.py"))
            .unwrap()
            .replace("gpu=\"H100\",", "gpu=\"A100\","),
    )
    .unwrap();
    let out = lode.cli(&["deploy", other.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            "gpu \"A100\" was requested, but this host has 2 GPU(s): NVIDIA H100 80GB HBM3"
        ),
        "{stderr}"
    );
}

/// `lode.toml` for the `samples/wasm-gpu` component as functions `a` and `b`, each with
/// `extra` lines of its own.
fn wasm_gpu_project(dir: &Path, a: &str, b: &str) -> String {
    let sample = repo_file("samples/wasm-gpu");
    let function = |name: &str, extra: &str| {
        format!(
            "[[function]]\nname = \"{name}\"\npath = \"{sample}\"\n{extra}\nvolumes = [{{ name = \
             \"mlp-weights\", path = \"/weights\", read_only = true, create_if_missing = true }}]\n"
        )
    };
    let toml = format!(
        "app = \"gpu-wasm\"\n{}{}",
        function("a", a),
        function("b", b)
    );
    std::fs::write(dir.join("lode.toml"), toml).unwrap();
    dir.to_str().unwrap().to_string()
}

/// Calls `gpu-wasm/<function>` with `kwargs`: its result, or its error's text.
fn call_kwargs(lode: &Lode, function: &str, kwargs: &str) -> Result<Value, String> {
    let body =
        serde_json::json!({"args": [], "kwargs": serde_json::from_str::<Value>(kwargs).unwrap()});
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer: Value = rt.block_on(async {
        let path = format!("/v1/apps/gpu-wasm/functions/{function}/call");
        let response = lode
            .api(reqwest::Method::POST, &path)
            .json(&body)
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    });
    match answer.get("result") {
        Some(result) => Ok(result.clone()),
        None => Err(answer["error"].to_string()),
    }
}

/// The devices a Wasm function holds, from `/metrics`.
fn wasm_gpus_held(lode: &Lode, function: &str) -> Option<i64> {
    let metrics = metrics(lode);
    metrics
        .lines()
        .find(|l| {
            l.starts_with("lode_function_gpus{")
                && l.contains("engine=\"wasm\"")
                && l.contains(&format!("function=\"{function}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A Wasm function that declares `gpu` is refused by name where nothing can drive the GPU
/// (no CUDA here) or it asks for more than one; with the CPU standing in for the device
/// (`--wasm-gpu-compute cpu`), it leases the fake root's one H100, shares it between its own
/// instances, and holds it while any runs: another function waits for it until its deadline,
/// and gets it once it is free. Kernels need `gpu_kernels`, and a CUDA device.
#[test]
fn wasm_functions_lease_one_gpu_and_wait_while_another_function_holds_it() {
    let root = tempfile::tempdir().unwrap();
    gpu_root(root.path(), 1);
    let root_arg = root.path().to_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    let project = wasm_gpu_project(work.path(), "gpu = \"any\"", "gpu = \"H100:2\"");

    let lode = Lode::start(&["--gpu-root", root_arg]);
    let out = lode.cli(&["deploy", &project]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("function \"a\": this host has the gpu \"any\" asks for, but")
            && stderr.contains("no CUDA driver (libcuda.so) on this host"),
        "{stderr}"
    );
    drop(lode);

    let lode = Lode::start(&["--gpu-root", root_arg, "--wasm-gpu-compute", "cpu"]);
    let out = lode.cli(&["deploy", &project]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("gpu \"H100:2\" asks for 2 devices, but a Wasm function gets one"),
        "{stderr}"
    );
    let project = wasm_gpu_project(
        work.path(),
        "gpu = \"any\"\ntimeout = 60",
        "gpu = \"H100\"\ntimeout = 2\ngpu_memory = 1",
    );
    let deployed = lode.cli_ok(&["deploy", &project]);
    assert!(deployed.contains("deployed gpu-wasm"), "{deployed}");

    let small = call_kwargs(&lode, "a", r#"{"matmul": 8}"#).unwrap();
    assert_eq!(
        small["device"], "cpu (standing in for NVIDIA H100 80GB HBM3)",
        "{small}"
    );
    // The device is given back when the instance ends.
    assert_eq!(wasm_gpus_held(&lode, "a"), Some(0));

    let busy = std::thread::scope(|scope| {
        let busy = scope.spawn(|| call_kwargs(&lode, "a", r#"{"busy": 8}"#));
        let held = harness::wait_for(Duration::from_secs(30), || {
            (wasm_gpus_held(&lode, "a") == Some(1)).then_some(())
        });
        assert!(held.is_some(), "a never held its GPU");
        // Another instance of a shares the device rather than waiting for it.
        let shared = call_kwargs(&lode, "a", r#"{"matmul": 8}"#).unwrap();
        assert_eq!(shared["checksum"], small["checksum"]);
        // b waits for the only H100 until its 2 s deadline, then fails by name.
        let waited = call_kwargs(&lode, "b", r#"{"matmul": 8}"#).unwrap_err();
        assert!(
            waited.contains("no_gpu")
                && waited.contains("every matching device stayed busy until the deadline"),
            "{waited}"
        );
        busy.join().unwrap()
    });
    let done = busy.unwrap();
    assert!(done["matmuls"].as_u64().unwrap() > 0, "{done}");
    assert_eq!(wasm_gpus_held(&lode, "a"), Some(0));
    // Free again: b gets it, with its own 1 MiB of buffers.
    let got = call_kwargs(&lode, "b", r#"{"matmul": 8}"#).unwrap();
    assert_eq!(got["checksum"], small["checksum"]);
    let over = call_kwargs(&lode, "b", r#"{"matmul": 512}"#).unwrap_err();
    assert!(over.contains("QuotaExceeded"), "{over}");

    // Kernels: refused without the capability, and by the CPU with it.
    let ptx = r#"{"ptx": ".version 7.0", "entry": "fill", "n": 4}"#;
    let refused = call_kwargs(&lode, "a", ptx).unwrap_err();
    assert!(refused.contains("did not ask for PTX kernels"), "{refused}");
    let project = wasm_gpu_project(work.path(), "gpu = \"any\"\ngpu_kernels = true", "");
    lode.cli_ok(&["deploy", &project]);
    let refused = call_kwargs(&lode, "a", ptx).unwrap_err();
    assert!(
        refused.contains("PTX kernels need the CUDA backend"),
        "{refused}"
    );
    // Without `gpu`, the capability is refused at deploy by name.
    let project = wasm_gpu_project(work.path(), "gpu_kernels = true", "");
    let out = lode.cli(&["deploy", &project]);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("gpu_kernels and gpu_memory are for Wasm functions that declare"),
        "{stderr}"
    );
}

/// On a machine with an NVIDIA GPU: a real container runs `nvidia-smi` and a CUDA matmul
/// (CuPy, against numpy). Skipped, with the reason printed, where there is none.
#[test]
fn a_real_gpu_runs_nvidia_smi_and_a_cuda_matmul_in_a_container() {
    let gpus = lode_wasi_gpu::inventory::inventory();
    if gpus.is_empty() {
        // Straight to stderr (eprintln! is captured by the test harness), so CI logs show the
        // skip and why.
        let _ = writeln!(
            std::io::stderr(),
            "skipped a_real_gpu_runs_nvidia_smi_and_a_cuda_matmul_in_a_container: no NVIDIA GPU \
             on this host (/proc/driver/nvidia/gpus is empty or missing)"
        );
        return;
    }
    let lode = Lode::start(&["--image-base-dir", BASE_DIR]);
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("cuda.py");
    std::fs::write(
        &app,
        r#"
import subprocess
import lode

image = lode.Image.debian_slim().uv_pip_install("cupy-cuda12x", "numpy")
app = lode.App("cuda-check", image=image)

@app.function(gpu="any", timeout=600)
def check() -> dict:
    import cupy, numpy
    a = numpy.random.default_rng(1).random((512, 512), dtype=numpy.float32)
    on_gpu = float(cupy.asnumpy(cupy.asarray(a) @ cupy.asarray(a)).sum())
    return {"smi": subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout,
            "gpu": on_gpu, "cpu": float((a @ a).sum())}
"#,
    )
    .unwrap();
    lode.cli_ok(&["deploy", app.to_str().unwrap()]);
    let seen = call(&lode, "cuda-check/check", &[]);
    assert!(seen["smi"].as_str().unwrap().contains("GPU 0"), "{seen}");
    let (gpu, cpu) = (seen["gpu"].as_f64().unwrap(), seen["cpu"].as_f64().unwrap());
    assert!((gpu - cpu).abs() <= 1e-4 * cpu.abs(), "{seen}");
}
