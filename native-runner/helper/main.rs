//! `lode-sandbox-helper`: the one program Lode runs inside a long-lived sandbox of any image.
//! It is linked statically and carries no secrets, so it needs nothing from the image and
//! leaks nothing into it. It runs with exactly the sandbox's rights (its namespaces, cgroups,
//! user, capabilities and seccomp profile), so a path it is given resolves inside the
//! sandbox's root and nowhere else.
//!
//! `init`      pid 1 of the sandbox: reaps orphans, waits for nothing else.
//! `read P`    P's bytes to stdout.
//! `write P`   stdin into P (created 0644, or truncated); `append P` adds to its end.
//! `ls P`      P's entries, one JSON object a line.
//! `stat P`    one JSON object.
//! `mkdir P`   P and its parents.
//! `rm P`      a file, or a directory and everything in it.
//!
//! Exit codes: 0 done, 2 not found, 3 wrong kind (a directory where a file was meant, or
//! the other way round), 4 permission denied, 5 no space left, 1 anything else; the reason
//! goes to stderr.

use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

unsafe extern "C" {
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
    fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
}

const PR_SET_DUMPABLE: i32 = 4;
const O_NONBLOCK: i32 = 0o4000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (op, path) = match args.as_slice() {
        [op] if op == "init" => init(),
        [op, path] => (op.as_str(), Path::new(path)),
        _ => fail(1, "usage: lode-sandbox-helper init | read|write|append|ls|stat|mkdir|rm PATH"),
    };
    // Nothing else in the sandbox may reach into a file call (its pipes to the server).
    // SAFETY: prctl(2) with integer arguments.
    unsafe { prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let done = match op {
        "read" => read(path),
        "write" => write(path, false),
        "append" => write(path, true),
        "ls" => list(path),
        "stat" => std::fs::symlink_metadata(path).map(|meta| println!("{}", json(path, &meta))),
        "mkdir" => std::fs::create_dir_all(path),
        "rm" => remove(path),
        other => fail(1, &format!("unknown operation {other:?}")),
    };
    if let Err(e) = done {
        let code = match e.kind() {
            io::ErrorKind::NotFound => 2,
            io::ErrorKind::IsADirectory | io::ErrorKind::NotADirectory => 3,
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => 4,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => 5,
            _ => 1,
        };
        fail(code, &format!("{}: {e}", path.display()));
    }
}

fn fail(code: i32, message: &str) -> ! {
    let _ = writeln!(io::stderr(), "{message}");
    std::process::exit(code)
}

/// Pid 1: every orphan of the sandbox becomes its child, and is reaped here.
fn init() -> ! {
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) with a valid out pointer.
        if unsafe { waitpid(-1, &mut status, 0) } == -1 {
            // No children now: look again later (orphans may arrive at any time).
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Only regular files are read or written: a FIFO or a device the sandbox put at the path
/// would otherwise hold the call (opened without blocking, then checked).
fn regular(file: &std::fs::File) -> io::Result<()> {
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::from(io::ErrorKind::IsADirectory));
    }
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(())
}

fn read(path: &Path) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)?;
    regular(&file)?;
    io::copy(&mut file, &mut io::stdout().lock())?;
    Ok(())
}

fn write(path: &Path, append: bool) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .append(append)
        .mode(0o644)
        .custom_flags(O_NONBLOCK)
        .open(path)?;
    regular(&file)?;
    if !append {
        file.set_len(0)?;
    }
    let mut buffer = vec![0u8; 256 << 10];
    let mut stdin = io::stdin().lock();
    loop {
        let n = stdin.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        file.write_all(&buffer[..n])?;
    }
    file.sync_data()
}

fn list(path: &Path) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    let mut out = io::stdout().lock();
    for entry in entries {
        let meta = entry.path().symlink_metadata()?;
        writeln!(out, "{}", json(Path::new(&entry.file_name()), &meta))?;
    }
    Ok(())
}

fn remove(path: &Path) -> io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// `{"name":…,"kind":"file|dir|symlink|other","size":…,"mode":…,"mtime":…}`.
fn json(path: &Path, meta: &std::fs::Metadata) -> String {
    let kind = if meta.is_dir() {
        "dir"
    } else if meta.is_file() {
        "file"
    } else if meta.file_type().is_symlink() {
        "symlink"
    } else {
        "other"
    };
    let name = path
        .file_name()
        .map_or_else(|| path.to_string_lossy(), |n| n.to_string_lossy());
    let mut quoted = String::from("\"");
    for c in name.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if (c as u32) < 0x20 => quoted.push_str(&format!("\\u{:04x}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    format!(
        "{{\"name\":{quoted},\"kind\":\"{kind}\",\"size\":{},\"mode\":{},\"mtime\":{}}}",
        meta.len(),
        meta.mode() & 0o7777,
        meta.mtime()
    )
}
