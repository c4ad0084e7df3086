use super::*;

#[test]
fn messages_keep_the_agents_wire_shape() {
    let input = ToAgent::Input {
        id: "in-1".into(),
        function: "square".into(),
        payload: serde_json::from_str(r#"{"args": [4], "kwargs": {}}"#).unwrap(),
    };
    assert_eq!(
        serde_json::to_value(&input).unwrap(),
        serde_json::json!({"type": "input", "id": "in-1", "function": "square", "args": [4], "kwargs": {}})
    );
    let output: FromAgent =
        serde_json::from_str(r#"{"type": "output", "id": "in-1", "result": null}"#).unwrap();
    // serde reads `null` as no result: callers treat an outcome with neither a result
    // nor an error as `None` returned.
    assert_eq!(
        output,
        FromAgent::Output {
            id: "in-1".into(),
            outcome: Outcome::default(),
        }
    );
    let failed: FromAgent = serde_json::from_str(
        r#"{"type": "output", "id": "in-2", "error": {"kind": "ValueError", "module": "builtins", "message": "no"}}"#,
    )
    .unwrap();
    let FromAgent::Output { outcome, .. } = failed else {
        panic!("{failed:?}")
    };
    assert_eq!(outcome.error.unwrap().kind, "ValueError");
    let call: FromAgent = serde_json::from_str(
        r#"{"type": "call", "call_id": "c-1", "token": "t", "op": "call", "app": "a", "function": "f", "args": [1], "kwargs": {}}"#,
    )
    .unwrap();
    assert!(matches!(call, FromAgent::Call { ref request, .. } if request.op == "call"));
}
