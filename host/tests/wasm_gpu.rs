//! `lode:gpu` from a real Wasm function on a real `lode serve`: the `samples/wasm-gpu` MLP
//! reads its weights from a volume and runs on the CPU backend (no `gpu` declared), checked
//! against the same computation in numpy; errors come back to the caller by name.

mod harness;

use std::process::Command;

use serde_json::{Value, json};

use harness::{Lode, repo_file, text};

/// A Python with numpy: `python3` here, or Debian's own where a pyenv shadows it.
fn numpy_python() -> &'static str {
    ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|python| {
            Command::new(python)
                .args(["-c", "import numpy"])
                .output()
                .is_ok_and(|out| out.status.success())
        })
        .expect(
            "the lode:gpu test needs numpy: apt-get install python3-numpy (./lode.sh test does)",
        )
}

/// Writes a three-layer model into `dir` and prints the input batch and numpy's answer.
const MODEL: &str = r#"
import json, sys
import numpy as np
dir = sys.argv[1]
rng = np.random.default_rng(3)
layers = [(16, 32, "gelu"), (32, 8, "relu"), (8, 4, "softmax")]
model = {"layers": []}
params = []
for i, (n_in, n_out, act) in enumerate(layers):
    w = rng.uniform(-0.5, 0.5, (n_in, n_out)).astype(np.float32)
    b = rng.uniform(-0.1, 0.1, n_out).astype(np.float32)
    w.tofile(f"{dir}/w{i}.f32")
    b.tofile(f"{dir}/b{i}.f32")
    model["layers"].append({"weights": f"w{i}.f32", "bias": f"b{i}.f32", "inputs": n_in, "outputs": n_out, "activation": act})
    params.append((w, b, act))
json.dump(model, open(f"{dir}/model.json", "w"))
x = rng.uniform(-1, 1, (5, 16)).astype(np.float32)
h = x.astype(np.float64)
for w, b, act in params:
    h = h @ w + b
    if act == "gelu":
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    elif act == "relu":
        h = np.maximum(h, 0)
    elif act == "softmax":
        e = np.exp(h - h.max(axis=1, keepdims=True))
        h = e / e.sum(axis=1, keepdims=True)
print(json.dumps({"input": x.tolist(), "expected": h.tolist()}))
"#;

#[test]
fn an_mlp_runs_on_lode_gpu_from_a_wasm_function_and_matches_numpy() {
    let lode = Lode::start(&[]);
    let deployed = lode.cli_ok(&["deploy", &repo_file("samples/wasm-gpu")]);
    assert!(deployed.contains("deployed wasm-gpu"), "{deployed}");

    // Before the weights are there, the call says where they go.
    let out = lode.cli(&["call", "wasm-gpu/mlp", "[[1, 2]]"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("put the model in the mlp-weights volume"),
        "{}",
        text(&out.stderr)
    );

    let weights = lode.data_dir().join("volumes/mlp-weights");
    let made = Command::new(numpy_python())
        .args(["-c", MODEL, weights.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made.stderr));
    let model: Value = serde_json::from_slice(&made.stdout).unwrap();
    let input = serde_json::to_string(&model["input"]).unwrap();
    let answer: Value =
        serde_json::from_str(&lode.cli_ok(&["call", "wasm-gpu/mlp", &input])).unwrap();
    let (got, want) = (
        answer.as_array().unwrap(),
        model["expected"].as_array().unwrap(),
    );
    assert_eq!(got.len(), 5, "{answer}");
    for (row, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.as_array().unwrap(), w.as_array().unwrap());
        assert_eq!(g.len(), 4);
        for (col, (g, w)) in g.iter().zip(w).enumerate() {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!(
                (g - w).abs() < 1e-5,
                "row {row} column {col}: lode:gpu gave {g}, numpy {w}"
            );
        }
    }

    // A malformed call is the caller's error, by name.
    let out = lode.cli(&["call", "wasm-gpu/mlp", "[[1, 2]]"]);
    assert!(
        text(&out.stderr).contains("each row must be a list of 16 numbers"),
        "{}",
        text(&out.stderr)
    );

    // The timing mode: the same product through lode:gpu and as a plain loop in the guest.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let checksums: Vec<f64> = ["gpu", "loop"]
        .iter()
        .map(|on| {
            let body = json!({"args": [], "kwargs": {"matmul": 48, "on": on}});
            let answer: Value = rt.block_on(async {
                let response = lode
                    .api(
                        reqwest::Method::POST,
                        "/v1/apps/wasm-gpu/functions/mlp/call",
                    )
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert!(response.status().is_success(), "{}", response.status());
                response.json().await.unwrap()
            });
            let result = &answer["result"];
            assert_eq!(result["device"], "cpu", "{answer}");
            result["checksum"].as_f64().unwrap()
        })
        .collect();
    assert!(
        (checksums[0] - checksums[1]).abs() < 1e-3 * checksums[1].abs().max(1.0),
        "{checksums:?}"
    );
}
