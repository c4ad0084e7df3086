//! `nth(n)`: the n-th prime (from 1), out of a table of every prime below 5 million that the
//! component builds at start-up, which takes tens of milliseconds.
//!
//! lode.toml deploys it twice: `nth` with `pre_init = true`, so the table is built once at
//! deploy and every call starts with it (Wizer), and `nth-cold`, which builds it in every call's
//! fresh instance. Each answer says whether the table was there when the call began.
//!
//!     lode deploy samples/wasm-preinit ; lode call primes/nth 1000000

use std::sync::OnceLock;

use lode_guest::{Error, Map, Value, json};

/// Primes below this are tabled.
const LIMIT: usize = 5_000_000;

static PRIMES: OnceLock<Vec<u32>> = OnceLock::new();

/// The sieve of Eratosthenes over odd numbers below [`LIMIT`].
fn sieve() -> Vec<u32> {
    let mut composite = vec![false; LIMIT / 2];
    let mut primes = vec![2];
    for i in 1..LIMIT / 2 {
        if composite[i] {
            continue;
        }
        let p = 2 * i + 1;
        primes.push(p as u32);
        // p * p would overflow a wasm32 usize for the large primes, which mark nothing anyway.
        if p > LIMIT / p {
            continue;
        }
        let mut multiple = p * p;
        while multiple < LIMIT {
            composite[multiple / 2] = true;
            multiple += 2 * p;
        }
    }
    primes
}

struct Nth;

impl lode_guest::Function for Nth {
    fn call(args: Vec<Value>, _kwargs: Map<String, Value>) -> Result<Value, Error> {
        let table_ready = PRIMES.get().is_some();
        let primes = PRIMES.get_or_init(sieve);
        let n = lode_guest::arg_i64(&args, 0)?;
        let prime = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| primes.get(i))
            .ok_or_else(|| {
                lode_guest::error(
                    "invalid_input",
                    format!("n must be 1 to {} (primes below {LIMIT})", primes.len()),
                )
            })?;
        Ok(json!({ "prime": prime, "table_ready_at_start": table_ready }))
    }

    fn init() {
        PRIMES.get_or_init(sieve);
    }
}

lode_guest::function!(Nth);
