//! The fuzz targets on stable, so CI needs no nightly: every input of the checked-in corpus
//! (`host/fuzz/corpus/<target>/`), then about a second per target of inputs mutated from it.
//! A panic, or an OCI layer that writes outside its directory, fails the test and prints the
//! input; `./lode.sh fuzz` runs the same targets under libFuzzer for minutes.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::Path;
use std::time::{Duration, Instant};

use lode_fs::{Body, FileContent, Meta, Node};

/// A small index with every kind of entry, as a seed the corpus files join.
fn index_seed() -> Vec<u8> {
    let meta = |mode| Meta {
        mode,
        uid: 0,
        gid: 0,
        mtime_sec: 1,
        mtime_nsec: 0,
    };
    let node = |name: &str, mode, body| Node {
        name: name.as_bytes().to_vec(),
        meta: meta(mode),
        xattrs: Vec::new(),
        body,
    };
    let file = |bytes: &[u8], link_group| Body::File {
        content: FileContent::Inline(bytes.to_vec()),
        link_group,
    };
    let digest = lode_registry::Digest::of(b"chunk");
    let root = node(
        "",
        0o755,
        Body::Dir(vec![
            node("hosts", 0o644, file(b"127.0.0.1 localhost\n", None)),
            node("a", 0o644, file(b"linked", Some(1))),
            node("b", 0o644, file(b"linked", Some(1))),
            node(
                "big",
                0o4755,
                Body::File {
                    content: FileContent::Chunks(vec![(digest, 5)]),
                    link_group: None,
                },
            ),
            node("sh", 0o777, Body::Symlink(b"busybox".to_vec())),
            node("kmsg", 0o600, Body::CharDevice(libc::makedev(1, 11))),
            node("fifo", 0o600, Body::Fifo),
            node(
                "etc",
                0o755,
                Body::Dir(vec![node("x", 0o600, file(b"", None))]),
            ),
        ]),
    );
    lode_fs::encode(&root).unwrap().bytes().to_vec()
}

/// A small deterministic generator (xorshift), so a failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One random edit of `input`: a bit flip, an interesting byte, an insert, a cut, a repeat,
/// a truncation, or a splice with another seed.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'/', b'.'];
    let len = input.len();
    match rng.below(7) {
        0 if len > 0 => {
            let at = rng.below(len);
            input[at] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let at = rng.below(len);
            input[at] = INTERESTING[rng.below(INTERESTING.len())];
        }
        2 => {
            let at = rng.below(len + 1);
            input.insert(at, rng.next() as u8);
        }
        3 if len > 1 => {
            let from = rng.below(len);
            let to = (from + 1 + rng.below(16)).min(len);
            input.drain(from..to);
        }
        4 if len > 0 => {
            let from = rng.below(len);
            let to = (from + 1 + rng.below(32)).min(len);
            let piece = input[from..to].to_vec();
            let at = rng.below(input.len() + 1);
            input.splice(at..at, piece);
        }
        5 => input.truncate(rng.below(len + 1)),
        _ => {
            let other = &seeds[rng.below(seeds.len())];
            if !other.is_empty() {
                let from = rng.below(other.len());
                let at = rng.below(len + 1);
                input.splice(at..at, other[from..].iter().copied().take(64));
            }
        }
    }
}

/// Runs `target` on `input`, naming the target and showing the input if it panics.
fn run(name: &str, target: fn(&[u8]), input: &[u8]) {
    let outcome = std::panic::catch_unwind(|| target(input));
    if outcome.is_err() {
        panic!(
            "fuzz target {name} panicked on {} bytes: {:?}",
            input.len(),
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn every_parser_survives_the_corpus_and_mutations_of_it() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in targets::TARGETS {
        let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(corpus.join(name))
            .unwrap_or_else(|e| panic!("corpus for {name}: {e}"))
            .flatten()
            .map(|entry| std::fs::read(entry.path()).unwrap())
            .collect();
        if name == "index" {
            seeds.push(index_seed());
        }
        assert!(!seeds.is_empty(), "no corpus for {name}");
        for seed in &seeds {
            run(name, target, seed);
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        let until = Instant::now() + Duration::from_millis(800);
        let mut tried = 0u32;
        while Instant::now() < until && tried < 20_000 {
            let mut input = seeds[rng.below(seeds.len())].clone();
            for _ in 0..1 + rng.below(4) {
                mutate(&mut rng, &mut input, &seeds);
            }
            run(name, target, &input);
            tried += 1;
        }
        eprintln!("{name}: {} corpus inputs, {tried} mutations", seeds.len());
    }
}
