//! What the Python tests share: a server on the cached Debian base, `lode run` with its
//! expected lines, and a function's `lode stats` row.

use super::{BASE_DIR, Lode, text};

/// A server for Python tests: the debootstrap base is the machine's cache, so no test
/// builds it.
pub fn start(extra: &[&str]) -> Lode {
    let mut args = vec!["--image-base-dir", BASE_DIR];
    args.extend_from_slice(extra);
    Lode::start(&args)
}

/// `lode run ARGS...`: it succeeds and its stdout holds every `expected` line; returns its
/// stderr (where the app's logs stream).
pub fn run_expecting(lode: &Lode, args: &[&str], expected: &[&str]) -> String {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    let run = lode.cli(&all);
    let (stdout, stderr) = (text(&run.stdout), text(&run.stderr));
    assert!(run.status.success(), "{stdout}\n{stderr}");
    for line in expected {
        assert!(
            stdout.contains(line),
            "missing {line:?}:\n{stdout}\n{stderr}"
        );
    }
    stderr
}

/// `lode stats APP`'s row for `function`, split into its columns.
pub fn stats_row(lode: &Lode, app: &str, function: &str) -> Vec<String> {
    let out = lode.cli_ok(&["stats", app]);
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(function))
        .unwrap_or_else(|| panic!("no row for {function} in:\n{out}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}
