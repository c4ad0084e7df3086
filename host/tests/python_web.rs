//! Python web serving through a real `lode serve`: ASGI and WSGI apps, web servers and
//! FastAPI endpoints by path and by host, streaming both ways, WebSockets, and web inputs
//! whose client goes away or whose app keeps working after it answered.

mod harness;

use std::time::Duration;

use harness::python::{run_expecting, start};
use harness::{repo_file, text};

#[test]
fn asgi_wsgi_and_web_servers_stream_both_ways_and_take_websockets() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let lode = start(&[]);
    let app = repo_file("samples/python-web/app.py");
    let deployed = lode.cli_ok(&["deploy", &app]);
    assert!(
        deployed.contains("python-web--web.lode.localhost"),
        "{deployed}"
    );
    // A client that only knows the names asks the server for the URL.
    let looked_up = lode.sdk_python(
        "import lode\nprint(lode.Function.from_name('python-web', 'web').get_web_url())",
    );
    assert_eq!(
        text(&looked_up.stdout).trim(),
        format!("{}/python-web/web", lode.http),
        "{}",
        text(&looked_up.stderr)
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // By path, the app sees its prefix as its root path; by host, it is at the root.
        let (status, body) = lode.get("/python-web/web/").await;
        assert_eq!((status, body.as_str()), (200, r#"{"hello":"world"}"#));
        let by_host = lode
            .public(reqwest::Method::GET, "/")
            .header("host", "python-web--web.lode.localhost")
            .send()
            .await
            .unwrap();
        assert_eq!(by_host.text().await.unwrap(), r#"{"hello":"world"}"#);
        // A large body reaches the app in parts.
        let echoed = lode
            .public(reqwest::Method::POST, "/python-web/web/echo")
            .body(vec![b'x'; 300_000])
            .send()
            .await
            .unwrap();
        assert_eq!(
            echoed.text().await.unwrap(),
            r#"{"bytes":300000,"root_path":"/python-web/web"}"#
        );
        // A streamed response arrives in parts, as the app yields them.
        let mut streamed = lode
            .public(reqwest::Method::GET, "/python-web/web/stream?n=4")
            .send()
            .await
            .unwrap();
        assert!(streamed.headers().get("content-length").is_none());
        let mut parts = Vec::new();
        while let Some(chunk) = streamed.chunk().await.unwrap() {
            parts.push(String::from_utf8(chunk.to_vec()).unwrap());
        }
        assert_eq!(parts.concat(), "chunk 0\nchunk 1\nchunk 2\nchunk 3\n");
        assert!(parts.len() > 1, "{parts:?}");
        let (status, _) = lode.get("/python-web/web/nothing-here").await;
        assert_eq!(status, 404);

        // A WebSocket, both ways, then closed by the client.
        let url = format!("{}/python-web/web/ws", lode.http.replacen("http", "ws", 1));
        let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        for word in ["hello", "lode"] {
            socket.send(Message::text(word)).await.unwrap();
            let answer = socket.next().await.unwrap().unwrap();
            assert_eq!(answer.into_text().unwrap().as_str(), word.to_uppercase());
        }
        socket.close(None).await.unwrap();

        // WSGI: SCRIPT_NAME is the mount, PATH_INFO the rest.
        let wsgi = lode
            .public(reqwest::Method::POST, "/python-web/legacy/a/b?x=1")
            .body("12345")
            .send()
            .await
            .unwrap();
        assert_eq!(wsgi.text().await.unwrap(), "/python-web/legacy /a/b x=1 5");
        // A server started in the container, reached through it.
        let (status, body) = lode.get("/python-web/files/hello.txt").await;
        assert_eq!((status, body.as_str()), (200, "hello from a file\n"));
        // A FastAPI-style endpoint converts its query parameters by annotation.
        let (status, body) = lode.get("/python-web/add?a=2&b=40").await;
        assert_eq!((status, body.as_str()), (200, r#"{"sum":42}"#));
        // A class's web methods: one instance, entered once, serves both.
        let (status, body) = lode.get("/python-web/Greeter-greet?name=lode").await;
        assert_eq!(
            (status, body.as_str()),
            (200, r#"{"greeting":"hello lode","entered":1}"#)
        );
        let by_host = lode
            .public(reqwest::Method::GET, "/")
            .header("host", "python-web--greeter-api.lode.localhost")
            .send()
            .await
            .unwrap();
        assert_eq!(
            by_host.text().await.unwrap(),
            r#"{"greeting":"hello","entered":1}"#
        );
    });
    assert!(deployed.contains("/python-web/Greeter-greet"), "{deployed}");
    let urls = run_expecting(&lode, &[&app], &["web: http://127.0.0.1:"]);
    drop(urls);
}

#[test]
fn web_inputs_end_when_their_app_returns_and_abandoned_ones_never_run() {
    let lode = start(&[]);
    lode.cli_ok(&["deploy", &repo_file("host/tests/python/web_queue.py")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (status, body) = lode.get("/webqueue/slow?tag=warm").await;
        assert_eq!((status, body.as_str()), (200, r#"{"tag":"warm"}"#));
        // The one container is busy for a while; a second request waits, and its client
        // gives up.
        let busy = lode.public(reqwest::Method::GET, "/webqueue/slow?tag=first&sleep=3");
        let first = tokio::spawn(busy.send());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let gone = lode
            .public(reqwest::Method::GET, "/webqueue/slow?tag=gone")
            .timeout(Duration::from_millis(500))
            .send()
            .await;
        assert!(gone.is_err(), "{gone:?}");
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.text().await.unwrap(), r#"{"tag":"first"}"#);
        let (status, _) = lode.get("/webqueue/slow?tag=last").await;
        assert_eq!(status, 200);
        // The answer comes at once; the work after it still holds the container, which
        // scales down only once the app returns.
        let (status, body) = lode.get("/webqueue/after").await;
        assert_eq!((status, body.as_str()), (200, "answered"));
    });
    // The answer came before the work after it ended.
    let logs = lode.cli_ok(&["logs", "webqueue"]);
    assert!(!logs.contains("background done"), "{logs}");
    let finished = harness::wait_for(Duration::from_secs(10), || {
        let logs = lode.cli_ok(&["logs", "webqueue"]);
        logs.contains("background done").then_some(())
    });
    assert!(finished.is_some(), "{}", lode.cli_ok(&["logs", "webqueue"]));
    let logs = lode.cli_ok(&["logs", "webqueue"]);
    assert!(
        logs.contains("ran first") && logs.contains("ran last"),
        "{logs}"
    );
    assert!(
        !logs.contains("ran gone"),
        "the abandoned request ran:\n{logs}"
    );
}
