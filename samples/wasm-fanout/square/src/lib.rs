//! `square(x)`: the leaf of the fan-out sample.

use lode_guest::{Error, Map, Value};

struct Square;

impl lode_guest::Function for Square {
    fn call(args: Vec<Value>, _kwargs: Map<String, Value>) -> Result<Value, Error> {
        let x = lode_guest::arg_i64(&args, 0)?;
        Ok(x.checked_mul(x)
            .ok_or_else(|| lode_guest::error("overflow", format!("{x} squared overflows")))?
            .into())
    }
}

lode_guest::function!(Square);
