//! `wasi-tools TOOL ARGS...`: small tools a Wasm-tier sandbox runs as WASI commands.
//!
//! Everyday tools: `true`, `echo`, `cat`, `write`, `ls`, `env`, `exit`, and `session`, which keeps a
//! running total of the numbers it reads on stdin (state kept between inputs, as a code
//! interpreter keeps its globals). Probes that show what the sandbox holds: `read`,
//! `connect`, `clock`, `alloc`, `spin`, `spew`.

use std::io::{BufRead, Read, Write};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((tool, rest)) = args.split_first() else {
        eprintln!("usage: wasi-tools true|echo|cat|write|ls|env|exit|session|read|connect|clock|alloc|spin|spew ...");
        std::process::exit(2);
    };
    let code = match run(tool, rest) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("wasi-tools {tool}: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn run(tool: &str, args: &[String]) -> std::io::Result<()> {
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let mut out = std::io::stdout().lock();
    match tool {
        "true" => {}
        "echo" => writeln!(out, "{}", args.join(" "))?,
        "cat" => {
            let mut bytes = Vec::new();
            if args.is_empty() {
                std::io::stdin().read_to_end(&mut bytes)?;
            } else {
                for path in args {
                    bytes.extend(std::fs::read(path)?);
                }
            }
            out.write_all(&bytes)?;
        }
        "write" => std::fs::write(arg(0), format!("{}\n", args[1..].join(" ")))?,
        "ls" => {
            let mut names: Vec<String> = std::fs::read_dir(arg(0))?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()?;
            names.sort();
            for name in names {
                writeln!(out, "{name}")?;
            }
        }
        "env" => {
            for (name, value) in std::env::vars() {
                writeln!(out, "{name}={value}")?;
            }
        }
        "exit" => std::process::exit(arg(0).parse().unwrap_or(1)),
        "session" => {
            let mut total: i64 = 0;
            for line in std::io::stdin().lock().lines() {
                let line = line?;
                match line.trim().parse::<i64>() {
                    Ok(n) => total += n,
                    Err(_) => writeln!(out, "not a number: {line}")?,
                }
                writeln!(out, "total {total}")?;
                out.flush()?;
            }
        }
        "read" => {
            let bytes = std::fs::read(arg(0))?;
            writeln!(out, "read {} bytes", bytes.len())?;
        }
        "connect" => {
            std::net::TcpStream::connect(arg(0))?;
            writeln!(out, "connected to {}", arg(0))?;
        }
        "clock" => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(std::io::Error::other)?;
            writeln!(out, "{}", now.as_secs())?;
        }
        "alloc" => {
            let mib: usize = arg(0).parse().unwrap_or(1);
            let mut held = Vec::new();
            for _ in 0..mib {
                held.push(vec![1u8; 1 << 20]);
            }
            writeln!(out, "held {} MiB", held.len())?;
        }
        "spin" => {
            let mut x: u64 = 1;
            loop {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        "spew" => {
            let mib: usize = arg(0).parse().unwrap_or(1);
            let line = vec![b'x'; 1 << 20];
            for _ in 0..mib {
                out.write_all(&line)?;
            }
        }
        other => {
            return Err(std::io::Error::other(format!("no tool {other:?}")));
        }
    }
    out.flush()
}
