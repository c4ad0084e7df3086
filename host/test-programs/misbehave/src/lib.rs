//! A `wasi:http/proxy` component that misbehaves on request, so tests can check that the host
//! contains it: `/trap`, `/spin`, `/sleep?ms=N`, `/alloc?mb=N`, `/fetch?url=URL`,
//! `/slow?chunks=N&ms=M`, `/headers`, `/print`, `/body`.

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingRequest,
    OutgoingResponse, ResponseOutparam, Scheme,
};
use wasip2::io::streams::StreamError;

wasip2::http::proxy::export!(Misbehave);

struct Misbehave;

/// Requests this instance has served: 1 on every request with a fresh instance per request.
static SERVED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn number(query: &str, key: &str, default: u64) -> u64 {
    param(query, key).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn sleep_ms(ms: u64) {
    wasip2::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
}

fn start(out: ResponseOutparam, status: u16) -> OutgoingBody {
    let response = OutgoingResponse::new(Fields::new());
    response.set_status_code(status).expect("valid status");
    let body = response.body().expect("a new response has a body");
    ResponseOutparam::set(out, Ok(response));
    body
}

fn respond(out: ResponseOutparam, status: u16, text: &str) {
    let body = start(out, status);
    {
        let mut stream = body.write().expect("body stream");
        stream.write_all(text.as_bytes()).expect("write");
        stream.flush().expect("flush");
    }
    OutgoingBody::finish(body, None).expect("finish");
}

fn header(request: &IncomingRequest, name: &str) -> String {
    request
        .headers()
        .get(name)
        .first()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

fn fetch(url: &str) -> String {
    let Some(rest) = url.strip_prefix("http://") else {
        return "error: only http:// URLs".into();
    };
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let request = OutgoingRequest::new(Fields::new());
    request.set_method(&Method::Get).expect("method");
    request.set_scheme(Some(&Scheme::Http)).expect("scheme");
    request.set_authority(Some(authority)).expect("authority");
    request.set_path_with_query(Some(&path)).expect("path");
    match wasip2::http::outgoing_handler::handle(request, None) {
        Err(code) => format!("error: {code:?}"),
        Ok(future) => {
            future.subscribe().block();
            match future.get() {
                Some(Ok(Ok(response))) => format!("status {}", response.status()),
                Some(Ok(Err(code))) => format!("error: {code:?}"),
                other => format!("error: {other:?}"),
            }
        }
    }
}

fn body_len(request: &IncomingRequest) -> Result<usize, String> {
    let body = request.consume().expect("body consumed once");
    let mut total = 0;
    {
        let stream = body.stream().expect("body stream");
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => total += chunk.len(),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => return Err(e.to_debug_string()),
            }
        }
    }
    IncomingBody::finish(body);
    Ok(total)
}

impl wasip2::exports::http::incoming_handler::Guest for Misbehave {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let served = SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let path_with_query = request.path_with_query().unwrap_or_default();
        let (path, query) = path_with_query.split_once('?').unwrap_or((path_with_query.as_str(), ""));
        match path {
            "/trap" => panic!("deliberate trap for testing"),
            "/spin" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "/sleep" => {
                sleep_ms(number(query, "ms", 1000));
                respond(out, 200, "slept\n");
            }
            "/alloc" => {
                let mb = number(query, "mb", 1) as usize;
                let mut v = vec![0u8; mb * 1024 * 1024];
                for i in (0..v.len()).step_by(4096) {
                    v[i] = 1;
                }
                respond(out, 200, &format!("allocated {mb} MiB ({})\n", std::hint::black_box(&v).len()));
            }
            "/fetch" => {
                let url = param(query, "url").unwrap_or_default().to_string();
                respond(out, 200, &format!("{}\n", fetch(&url)));
            }
            "/slow" => {
                let chunks = number(query, "chunks", 5);
                let ms = number(query, "ms", 200);
                let body = start(out, 200);
                {
                    let mut stream = body.write().expect("body stream");
                    for i in 0..chunks {
                        writeln!(stream, "misbehave chunk {i}").expect("write");
                        stream.flush().expect("flush");
                        sleep_ms(ms);
                    }
                }
                OutgoingBody::finish(body, None).expect("finish");
            }
            "/headers" => {
                let text = format!(
                    "path={path_with_query}\nprefix={}\nauthority={}\n",
                    header(&request, "x-forwarded-prefix"),
                    request.authority().unwrap_or_default(),
                );
                respond(out, 200, &text);
            }
            "/print" => {
                println!("to stdout from misbehave");
                eprintln!("to stderr from misbehave");
                respond(out, 200, "printed\n");
            }
            "/served" => respond(out, 200, &format!("served {served}\n")),
            // Sends a complete response but never finishes or drops its body: on a kept
            // instance the client would wait for the body's end as long as the instance lives.
            "/leave-open" => {
                let body = start(out, 200);
                {
                    let mut stream = body.write().expect("body stream");
                    writeln!(stream, "left open").expect("write");
                    stream.flush().expect("flush");
                }
                std::mem::forget(body);
            }
            "/body" => match body_len(&request) {
                Ok(n) => respond(out, 200, &format!("{n} bytes\n")),
                Err(e) => respond(out, 400, &format!("body error: {e}\n")),
            },
            _ => respond(out, 200, "misbehave\n"),
        }
    }
}
