// A `wasi:http` handler written in JavaScript and packaged by componentize-js (SpiderMonkey,
// as StarlingMonkey, inside the component: about 13 MB). Lode deploys it as it is: no Lode
// SDK, no wrapper.
//
//     componentize-js samples/js-http/app.js -w samples/python-http/wit \
//         -n wasi:http/proxy@0.2.12 -o js-http.wasm
//     lode deploy js-http.wasm --name jshttp
//     curl http://127.0.0.1:8080/jshttp/
//
// It reuses the Python sample's WIT (WASI 0.2.12). StarlingMonkey itself is built against
// WASI 0.2.10; its imports merge into 0.2.12 ones, but its own `fetch` event handler only
// exports `wasi:http/incoming-handler@0.2.10`, so this module exports the 0.2.12 handler by
// hand (`incomingHandler`). package.json pins the tools; `./lode.sh test` installs them into
// its cache with `npm ci --prefix`, never into this folder.

import { Fields, OutgoingBody, OutgoingResponse, ResponseOutparam } from 'wasi:http/types@0.2.12';

const utf8 = new TextEncoder();

// Module state lives as long as the instance: a fresh one per request by default, so this
// counts 1 every time; with `instance_reuse = N` one instance serves N requests.
let served = 0;

export const incomingHandler = {
  handle(request, responseOut) {
    served += 1;
    const path = request.pathWithQuery() ?? '/';
    const response = new OutgoingResponse(Fields.fromList([['content-type', utf8.encode('text/plain')]]));
    const body = response.body();
    ResponseOutparam.set(responseOut, { tag: 'ok', val: response });
    const stream = body.write();
    stream.blockingWriteAndFlush(
      utf8.encode(`hello from javascript at ${path} (request ${served} of this instance)\n`),
    );
    // The stream must be dropped before its body is finished.
    stream[Symbol.dispose]();
    OutgoingBody.finish(body, undefined);
  },
};
