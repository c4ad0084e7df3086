//! A `wasi:http/proxy` component that answers every request with `hello`.
//!
//! It runs unchanged under `lode serve` and `wasmtime serve`:
//! `lode deploy samples/hello-http --name hello && curl http://127.0.0.1:8080/hello/`.

use std::io::Write as _;

use wasip2::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

wasip2::http::proxy::export!(Hello);

struct Hello;

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
            .expect("static headers are valid");
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("a new response has a body");
        ResponseOutparam::set(response_out, Ok(response));
        let mut out = body.write().expect("the body stream opens once");
        out.write_all(b"hello\n").expect("writing the body");
        out.flush().expect("flushing the body");
        drop(out);
        OutgoingBody::finish(body, None).expect("finishing the body");
    }
}
