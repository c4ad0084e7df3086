use super::*;

#[test]
fn only_run_and_dev_names_may_act_as_another_app() {
    let mut manifest = Manifest {
        version: MANIFEST_VERSION,
        app: "shop-run-0a1b2c".into(),
        config: Default::default(),
        limits: Default::default(),
        allow_callers: Vec::new(),
        run_of: Some("shop".into()),
        functions: vec![wasm_fn("web")],
    };
    assert!(manifest.validate().is_ok());
    manifest.app = "shop-dev".into();
    assert!(manifest.validate().is_ok());
    for app in ["billing", "shop-run-xyz", "shopx-dev", "s-dev"] {
        manifest.app = app.into();
        let problems = manifest.validate().unwrap_err().join("\n");
        assert!(problems.contains("run_of"), "{app}: {problems}");
    }
}

fn wasm_fn(name: &str) -> FunctionSpec {
    FunctionSpec::wasm_http(name, &lode_registry::Digest::of(b"x"))
}

/// `instance_reuse` is for Wasm functions that serve HTTP without a GPU, within bounds.
#[test]
fn instance_reuse_is_checked() {
    let problems = |spec: FunctionSpec| {
        let mut problems = Vec::new();
        spec.validate(&mut problems);
        problems.join("\n")
    };
    let mut ok = wasm_fn("web");
    ok.instance_reuse = Some(100);
    assert_eq!(problems(ok.clone()), "");
    let mut zero = ok.clone();
    zero.instance_reuse = Some(0);
    assert!(problems(zero).contains("instance_reuse 0 must be from 1 to 1000000"));
    let mut no_route = ok.clone();
    no_route.web = None;
    assert!(problems(no_route).contains("instance_reuse is for Wasm functions that serve HTTP"));
    let mut gpu = ok;
    gpu.resources.gpu = Some("any".into());
    assert!(problems(gpu).contains("cannot be used with `gpu`"));
}

#[test]
fn dns_labels() {
    for good in ["a", "hello", "a-b", "x1", &"a".repeat(63)] {
        assert!(is_dns_label(good), "{good}");
    }
    for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64), "héllo"] {
        assert!(!is_dns_label(bad), "{bad}");
    }
}

#[test]
fn reports_every_problem() {
    let mut second = wasm_fn("Bad_Name");
    second.component = Some("sha256:abc".into());
    second.resources.timeout = Some(-1.0);
    let manifest = Manifest {
        version: 1,
        app: "My App".into(),
        config: Default::default(),
        limits: AppLimits {
            call_depth: Some(0),
            fuel: Some(10),
            ..Default::default()
        },
        allow_callers: vec!["Other App".into()],
        run_of: None,
        functions: vec![wasm_fn("web"), second],
    };
    let problems = manifest.validate().unwrap_err();
    let all = problems.join("\n");
    assert!(all.contains("invalid app name \"My App\""), "{all}");
    assert!(all.contains("invalid function name \"Bad_Name\""), "{all}");
    assert!(all.contains("is not a digest"), "{all}");
    assert!(all.contains("timeout -1"), "{all}");
    assert!(all.contains("claimed by more than one"), "{all}");
    assert!(all.contains("call_depth 0 must be 1 to 64"), "{all}");
    assert!(all.contains("fuel 10 must be 1000 to"), "{all}");
    assert!(
        all.contains("allow_callers: invalid caller app name \"Other App\""),
        "{all}"
    );
}

#[test]
fn json_round_trip_and_unknown_fields() {
    let manifest = Manifest {
        version: 1,
        app: "hello".into(),
        config: Default::default(),
        limits: AppLimits {
            wasm_stack_kib: Some(128),
            call_depth: None,
            fan_out: Some(10),
            fuel: Some(5_000_000),
        },
        allow_callers: vec!["billing".into()],
        run_of: None,
        functions: vec![wasm_fn("web")],
    };
    let json = serde_json::to_string(&manifest).unwrap();
    assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), manifest);
    assert!(manifest.validate().is_ok());
    let typo = json.replace("\"functions\"", "\"functoins\"");
    let err = serde_json::from_str::<Manifest>(&typo)
        .unwrap_err()
        .to_string();
    assert!(err.contains("functoins"), "{err}");
}
