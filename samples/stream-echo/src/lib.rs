//! A `wasi:http/proxy` component that streams in both directions.
//!
//! - `POST /echo?times=N` reads the request body chunk by chunk and streams it back `N` times
//!   (default 3), so the response is larger than the request.
//! - `GET /lines?n=N` streams `N` numbered lines (default 1000).
//!
//! Each request logs one line to stdout, which `lode logs APP` shows.

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasip2::io::streams::StreamError;

wasip2::http::proxy::export!(StreamEcho);

struct StreamEcho;

fn query_number(query: &str, key: &str, default: u64) -> u64 {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

fn respond(out: ResponseOutparam, status: u16, write: impl FnOnce(&mut dyn std::io::Write)) {
    let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
        .expect("static headers are valid");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("valid status");
    let body = response.body().expect("a new response has a body");
    ResponseOutparam::set(out, Ok(response));
    {
        // Buffer small writes: each flush is a round trip through the host.
        let stream = body.write().expect("the body stream opens once");
        let mut buffered = std::io::BufWriter::with_capacity(64 * 1024, stream);
        write(&mut buffered);
        buffered.flush().expect("flushing the body");
    }
    OutgoingBody::finish(body, None).expect("finishing the body");
}

/// Reads the whole request body, chunk by chunk as it arrives.
fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let body = request.consume().expect("the body is consumed once");
    let mut received = Vec::new();
    {
        let stream = body.stream().expect("the body stream opens once");
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => received.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    panic!("reading the request body failed: {}", e.to_debug_string())
                }
            }
        }
    }
    IncomingBody::finish(body);
    received
}

impl wasip2::exports::http::incoming_handler::Guest for StreamEcho {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path_with_query = request.path_with_query().unwrap_or_default();
        let (path, query) = path_with_query
            .split_once('?')
            .unwrap_or((path_with_query.as_str(), ""));
        match path {
            "/echo" => {
                let times = query_number(query, "times", 3);
                let received = read_body(&request);
                println!("echo: received {} bytes, sending them {times} times", received.len());
                respond(out, 200, |w| {
                    for _ in 0..times {
                        w.write_all(&received).expect("writing the body");
                    }
                });
            }
            "/lines" => {
                let n = query_number(query, "n", 1000);
                println!("lines: streaming {n} lines");
                respond(out, 200, |w| {
                    for i in 0..n {
                        writeln!(w, "line {i}").expect("writing the body");
                    }
                });
            }
            _ => respond(out, 404, |w| {
                w.write_all(b"try POST /echo?times=N or GET /lines?n=N\n")
                    .expect("writing the body");
            }),
        }
    }
}
