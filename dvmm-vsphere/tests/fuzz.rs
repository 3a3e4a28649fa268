//! Robustness of the response reader and fault decoder: arbitrary bytes and
//! mutated recorded fixtures must never panic, hang or blow up memory, only
//! return errors.
//!
//! Every run draws a fresh seed and prints it; case `i` of a run is built
//! from the seed and `i` alone, so a failure names both and replays alone
//! with `DVMM_FUZZ_SEED=<seed> DVMM_FUZZ_CASE=<i>`. `DVMM_FUZZ_CASES` sets
//! the number of cases (default 2,000). Run a long campaign with
//! `DVMM_FUZZ_CASES=1000000 cargo test --release -p dvmm-vsphere --test fuzz -- --nocapture`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dvmm_vsphere::methods::decode_updates;
use dvmm_vsphere::soap::{Response, read_response};
use dvmm_vsphere::types::{ServiceContent, TaskInfo, VmProperties, object_contents};
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng};

fn fixtures() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("fixtures folder")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "xml"))
        .map(|e| std::fs::read(e.path()).expect("fixture"))
        .collect();
    out.sort();
    assert!(out.len() >= 10, "fixtures missing");
    out
}

/// Feeds one input through everything that reads server answers.
fn exercise(bytes: &[u8]) -> usize {
    match read_response(bytes) {
        Err(e) => e.to_string().len(),
        Ok(Response::Fault(f)) => f.into_error("user").to_string().len(),
        Ok(Response::Ok(node)) => {
            let mut n = 0;
            for object in object_contents(&node) {
                let vm = VmProperties::from_content(&object);
                n += vm.hardware.devices.len() + usize::from(vm.guest.usable_ipv4().is_some());
                let mut task = TaskInfo::default();
                for (path, val) in &object.props {
                    task.apply(path, Some(val));
                }
                if let Some(err) = task.error {
                    n += err.into_error("u").to_string().len();
                }
                for missing in object.missing {
                    n += missing.fault.into_error("u").to_string().len();
                }
            }
            let updates = decode_updates(&node);
            let mut vm = VmProperties::default();
            for c in &updates.changes {
                vm.apply(&c.path, c.val.as_ref());
            }
            if let Some(r) = node.child("returnval") {
                n += usize::from(ServiceContent::from_node(r).is_some());
            }
            n + updates.changes.len()
        }
    }
}

const TOKENS: &[&[u8]] = &[
    b"<", b">", b"</", b"/>", b"<a>", b"</a>", b"&amp;", b"&#0;", b"&#xFFFFFF;", b"&bogus;",
    b"xmlns:x=\"", b"x:type=\"", b"\"", b"<![CDATA[", b"]]>", b"<!--", b"-->", b"<?xml ?>",
    b"\xff\xfe", b"\0", b"<val xmlns:XMLSchema-instance=\"http://www.w3.org/2001/XMLSchema-instance\" XMLSchema-instance:type=\"",
    b"<fault>", b"<missingSet>", b"<returnval>", b"<objects>", b"<changeSet>",
];

const VALUE_CHARS: &[u8] = b"0123456789abcdefXYZ-.:_ /[]@";

/// Mutation kinds, by the number `mutate` draws; for the per-kind counts.
const KINDS: [&str; 9] = [
    "random bytes",
    "flipped bytes",
    "truncated",
    "duplicated slice",
    "deleted slice",
    "inserted tokens",
    "spliced fixtures",
    "junk text between tags",
    "retyped values",
];

/// Kinds whose output is no longer well-formed XML in nearly every case.
const BREAKING: [usize; 2] = [0, 2];

/// The kind whose output stays well-formed: the XML reader must accept it
/// so that the typed decoders see it.
const WELL_FORMED: usize = 8;

fn mutate(rng: &mut StdRng, corpus: &[Vec<u8>]) -> (usize, Vec<u8>) {
    let kind = rng.random_range(0..KINDS.len());
    (kind, mutate_as(kind, rng, corpus))
}

fn mutate_as(kind: usize, rng: &mut StdRng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let base = &corpus[rng.random_range(0..corpus.len())];
    let mut data = base.clone();
    match kind {
        // Structure-preserving mutations: the document stays well-formed, so
        // the typed decoders (not just the XML reader) see odd values.
        7 => {
            for _ in 0..rng.random_range(1..6) {
                let gaps: Vec<usize> = data
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| **b == b'>')
                    .map(|(i, _)| i + 1)
                    .collect();
                if gaps.is_empty() {
                    break;
                }
                let at = gaps[rng.random_range(0..gaps.len())];
                let junk: Vec<u8> = (0..rng.random_range(0..12))
                    .map(|_| VALUE_CHARS[rng.random_range(0..VALUE_CHARS.len())])
                    .collect();
                data.splice(at..at, junk);
            }
            return data;
        }
        8 => {
            // Retype a value: another xsi:type, or a managed object type.
            let text = String::from_utf8_lossy(&data).into_owned();
            let types = [
                "xsd:int",
                "VirtualDisk",
                "ArrayOfGuestNicInfo",
                "TaskInfo",
                "x:y:z",
                "",
                "LocalizedMethodFault",
            ];
            let from = [
                "xsd:string",
                "VirtualE1000",
                "TaskInfoState",
                "ManagedObjectReference",
                "VirtualMachinePowerState",
            ];
            let f = from[rng.random_range(0..from.len())];
            let t = types[rng.random_range(0..types.len())];
            return text.replacen(f, t, rng.random_range(1..4)).into_bytes();
        }
        0 => {
            let len = rng.random_range(0..600);
            return (0..len).map(|_| rng.random()).collect();
        }
        1 => {
            for _ in 0..rng.random_range(1..8) {
                if data.is_empty() {
                    break;
                }
                let i = rng.random_range(0..data.len());
                data[i] = rng.random();
            }
        }
        2 => {
            let cut = rng.random_range(0..=data.len());
            data.truncate(cut);
        }
        3 => {
            if !data.is_empty() {
                let a = rng.random_range(0..data.len());
                let b = rng.random_range(a..=data.len().min(a + 400));
                let slice = data[a..b].to_vec();
                let at = rng.random_range(0..=data.len());
                data.splice(at..at, slice);
            }
        }
        4 => {
            if !data.is_empty() {
                let a = rng.random_range(0..data.len());
                let b = rng.random_range(a..=data.len().min(a + 200));
                data.drain(a..b);
            }
        }
        5 => {
            for _ in 0..rng.random_range(1..5) {
                let token = TOKENS[rng.random_range(0..TOKENS.len())];
                let at = rng.random_range(0..=data.len());
                data.splice(at..at, token.iter().copied());
            }
        }
        _ => {
            let other = &corpus[rng.random_range(0..corpus.len())];
            let a = rng.random_range(0..=data.len());
            let b = rng.random_range(0..=other.len());
            data.truncate(a);
            data.extend_from_slice(&other[b..]);
        }
    }
    data
}

/// No input up to this size may take longer to read.
const CASE_DEADLINE: Duration = Duration::from_secs(10);

/// Inputs are cut to this size; the mutations only grow fixtures (at most
/// 9 KiB) by a few hundred bytes, so the cut is a guard, not a filter.
const MAX_INPUT: usize = 64 * 1024;

/// How much the process may grow while fuzzing before the test fails: a
/// reader that keeps what it read, or allocates by a length taken from its
/// input, shows up here long before it exhausts the machine.
const MAX_GROWTH: u64 = 512 * 1024 * 1024;

/// The input of case `index` of the run with `seed`: a function of both
/// alone, so any case replays without the ones before it.
fn case(seed: u64, index: u64, corpus: &[Vec<u8>]) -> (usize, Vec<u8>) {
    let mut rng = StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let (kind, mut input) = mutate(&mut rng, corpus);
    input.truncate(MAX_INPUT);
    (kind, input)
}

/// Resident memory of this process (Linux; `None` elsewhere).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={value} is not a number")))
}

/// What the worker thread reports about each case.
enum Report {
    Started(u64),
    Finished {
        index: u64,
        kind: usize,
        rejected: bool,
        checksum: usize,
    },
    Panicked(u64),
}

#[test]
fn reader_and_fault_decoder_never_panic() {
    let cases = env_u64("DVMM_FUZZ_CASES").unwrap_or(2_000);
    let seed = env_u64("DVMM_FUZZ_SEED").unwrap_or_else(rand::random);
    let only = env_u64("DVMM_FUZZ_CASE");
    println!("fuzz: seed {seed:#x} (replay with DVMM_FUZZ_SEED={seed:#x})");
    let corpus = fixtures();
    // Unmutated fixtures decode without protocol errors.
    for (i, f) in corpus.iter().enumerate() {
        if let Err(e) = read_response(f) {
            panic!("fixture {i} (sorted by content) is rejected: {e}");
        }
    }
    let indexes: Vec<u64> = match only {
        Some(i) => vec![i],
        None => (0..cases).collect(),
    };
    let total = indexes.len() as u64;
    let baseline = resident_bytes();

    // The cases run on a worker thread so that this thread can give up on
    // one that hangs, naming it.
    let (tx, rx) = mpsc::channel();
    let worker_corpus = corpus.clone();
    std::thread::spawn(move || {
        for index in indexes {
            if tx.send(Report::Started(index)).is_err() {
                return;
            }
            let (kind, input) = case(seed, index, &worker_corpus);
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                (read_response(&input).is_err(), exercise(&input))
            }));
            let report = match outcome {
                Ok((rejected, checksum)) => Report::Finished {
                    index,
                    kind,
                    rejected,
                    checksum,
                },
                Err(_) => Report::Panicked(index),
            };
            if tx.send(report).is_err() {
                return;
            }
        }
    });

    let replay = |index: u64| {
        format!(
            "seed {seed:#x}, case {index} (replay: DVMM_FUZZ_SEED={seed:#x} DVMM_FUZZ_CASE={index})"
        )
    };
    let started = Instant::now();
    let mut checksum = 0usize;
    let mut per_kind = [(0u64, 0u64); KINDS.len()];
    let mut current = None;
    let mut finished = 0;
    while finished < total {
        match rx.recv_timeout(CASE_DEADLINE) {
            Ok(Report::Started(index)) => current = Some(index),
            Ok(Report::Finished {
                index,
                kind,
                rejected,
                checksum: c,
            }) => {
                finished += 1;
                checksum = checksum.wrapping_add(c);
                per_kind[kind].0 += 1;
                per_kind[kind].1 += u64::from(rejected);
                if index % 100 == 0
                    && let (Some(before), Some(now)) = (baseline, resident_bytes())
                {
                    assert!(
                        now.saturating_sub(before) < MAX_GROWTH,
                        "memory grew from {before} to {now} bytes by {}",
                        replay(index)
                    );
                }
            }
            Ok(Report::Panicked(index)) => panic!("the reader panicked on {}", replay(index)),
            Err(mpsc::RecvTimeoutError::Timeout) => match current {
                Some(index) => panic!("no answer within {CASE_DEADLINE:?} on {}", replay(index)),
                None => panic!("the fuzz worker did not start within {CASE_DEADLINE:?}"),
            },
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the fuzz worker stopped after {finished} of {total} cases")
            }
        }
    }

    let rejected: u64 = per_kind.iter().map(|(_, r)| r).sum();
    println!(
        "fuzz: {total} cases (seed {seed:#x}) in {:.1?}, {rejected} rejected as malformed, checksum {checksum}",
        started.elapsed()
    );
    for (kind, (n, r)) in per_kind.iter().enumerate() {
        println!("fuzz:   {:<24} {r:>6} of {n:>6} rejected", KINDS[kind]);
    }
    if only.is_some() || total < 500 {
        return;
    }
    // A reader that accepted everything, or nothing, would pass the checks
    // above; the mutations that break the document must be rejected and
    // the rest must mostly get through to the typed decoders.
    for kind in BREAKING {
        let (n, r) = per_kind[kind];
        assert!(
            r * 10 >= n * 9,
            "only {r} of {n} inputs of kind \"{}\" were rejected (seed {seed:#x})",
            KINDS[kind]
        );
    }
    let (n, r) = per_kind[WELL_FORMED];
    assert!(
        r * 10 <= n,
        "{r} of {n} well-formed inputs of kind \"{}\" were rejected (seed {seed:#x})",
        KINDS[WELL_FORMED]
    );
    // About three in four over many seeds; far outside that, the reader or
    // the mutations changed and the fuzzing no longer tests what it did.
    assert!(
        (total / 2..=total * 9 / 10).contains(&rejected),
        "{rejected} of {total} inputs were rejected, expected between half and nine tenths (seed {seed:#x})"
    );
}
