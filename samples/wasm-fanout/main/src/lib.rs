//! `main({"n": N})`: calls `square(i)` for i in 0..N and returns the sum of the squares.
//! `"target": "app/function"` calls another function instead (a Python one, say), and
//! `"spawn": true` starts all the calls first and then waits for each. `"timed": true`
//! returns `{"sum": S, "nanos": [...]}`, each call's time as this guest's clock saw it (what
//! `lode bench calls` reports as the per-invoke p50).

use lode_guest::{Error, Map, Value, json};

struct Main;

impl lode_guest::Function for Main {
    fn call(args: Vec<Value>, _kwargs: Map<String, Value>) -> Result<Value, Error> {
        let params = args.first().cloned().unwrap_or_else(|| json!({}));
        let n = params["n"]
            .as_i64()
            .ok_or_else(|| lode_guest::error("invalid_input", "give {\"n\": N}"))?;
        let target = params["target"].as_str().unwrap_or("square");
        let (app, function) = target.split_once('/').unwrap_or(("", target));
        let mut sum: i64 = 0;
        if params["spawn"].as_bool() == Some(true) {
            let ids = (0..n)
                .map(|i| lode_guest::spawn(app, function, &[json!(i)]))
                .collect::<Result<Vec<_>, _>>()?;
            for id in ids {
                sum += lode_guest::wait(&id)?.as_i64().unwrap_or(0);
            }
        } else if params["timed"].as_bool() == Some(true) {
            let mut nanos = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
            for i in 0..n {
                let started = std::time::Instant::now();
                let square = lode_guest::invoke(app, function, &[json!(i)])?;
                nanos.push(started.elapsed().as_nanos() as u64);
                sum += square.as_i64().unwrap_or(0);
            }
            return Ok(json!({ "sum": sum, "nanos": nanos }));
        } else {
            for i in 0..n {
                sum += lode_guest::invoke(app, function, &[json!(i)])?
                    .as_i64()
                    .unwrap_or(0);
            }
        }
        if let Some(greeting) = lode_guest::config("greeting") {
            lode_guest::log(&format!("{greeting}: sum of {n} squares is {sum}"));
        }
        Ok(json!(sum))
    }
}

lode_guest::function!(Main);
