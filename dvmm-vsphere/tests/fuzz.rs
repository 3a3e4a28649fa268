//! Robustness of the response reader and fault decoder: arbitrary bytes and
//! mutated recorded fixtures must never panic, only return errors.
//!
//! `DVMM_FUZZ_CASES` sets the number of cases (default 2,000); `DVMM_FUZZ_SEED`
//! the seed. Run a long campaign with
//! `DVMM_FUZZ_CASES=1000000 cargo test --release -p dvmm-vsphere --test fuzz -- --nocapture`.

use std::time::Instant;

use dvmm_vsphere::methods::decode_updates;
use dvmm_vsphere::soap::{Response, read_response};
use dvmm_vsphere::types::{ServiceContent, TaskInfo, VmProperties, object_contents};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

fn mutate(rng: &mut StdRng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let base = &corpus[rng.gen_range(0..corpus.len())];
    let mut data = base.clone();
    match rng.gen_range(0..9) {
        // Structure-preserving mutations: the document stays well-formed, so
        // the typed decoders (not just the XML reader) see odd values.
        7 => {
            for _ in 0..rng.gen_range(1..6) {
                let gaps: Vec<usize> = data
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| **b == b'>')
                    .map(|(i, _)| i + 1)
                    .collect();
                if gaps.is_empty() {
                    break;
                }
                let at = gaps[rng.gen_range(0..gaps.len())];
                let junk: Vec<u8> = (0..rng.gen_range(0..12))
                    .map(|_| VALUE_CHARS[rng.gen_range(0..VALUE_CHARS.len())])
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
            let f = from[rng.gen_range(0..from.len())];
            let t = types[rng.gen_range(0..types.len())];
            return text.replacen(f, t, rng.gen_range(1..4)).into_bytes();
        }
        0 => {
            let len = rng.gen_range(0..600);
            return (0..len).map(|_| rng.r#gen()).collect();
        }
        1 => {
            for _ in 0..rng.gen_range(1..8) {
                if data.is_empty() {
                    break;
                }
                let i = rng.gen_range(0..data.len());
                data[i] = rng.r#gen();
            }
        }
        2 => {
            let cut = rng.gen_range(0..=data.len());
            data.truncate(cut);
        }
        3 => {
            if !data.is_empty() {
                let a = rng.gen_range(0..data.len());
                let b = rng.gen_range(a..=data.len().min(a + 400));
                let slice = data[a..b].to_vec();
                let at = rng.gen_range(0..=data.len());
                data.splice(at..at, slice);
            }
        }
        4 => {
            if !data.is_empty() {
                let a = rng.gen_range(0..data.len());
                let b = rng.gen_range(a..=data.len().min(a + 200));
                data.drain(a..b);
            }
        }
        5 => {
            for _ in 0..rng.gen_range(1..5) {
                let token = TOKENS[rng.gen_range(0..TOKENS.len())];
                let at = rng.gen_range(0..=data.len());
                data.splice(at..at, token.iter().copied());
            }
        }
        _ => {
            let other = &corpus[rng.gen_range(0..corpus.len())];
            let a = rng.gen_range(0..=data.len());
            let b = rng.gen_range(0..=other.len());
            data.truncate(a);
            data.extend_from_slice(&other[b..]);
        }
    }
    data
}

#[test]
fn reader_and_fault_decoder_never_panic() {
    let cases: u64 = std::env::var("DVMM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let seed: u64 = std::env::var("DVMM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let corpus = fixtures();
    // Unmutated fixtures decode without protocol errors.
    for f in &corpus {
        assert!(read_response(f).is_ok());
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut checksum = 0usize;
    let mut errors = 0u64;
    for _ in 0..cases {
        let input = mutate(&mut rng, &corpus);
        if read_response(&input).is_err() {
            errors += 1;
        }
        checksum = checksum.wrapping_add(exercise(&input));
    }
    println!(
        "fuzz: {cases} cases (seed {seed:#x}) in {:.1?}, {errors} rejected as malformed, checksum {checksum}",
        started.elapsed()
    );
}
