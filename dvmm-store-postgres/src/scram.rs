//! SCRAM-SHA-256 password verifiers computed on the client, so that
//! [`crate::create_app_login`] never sends a password to the server.
//!
//! The format is the one PostgreSQL stores in `pg_authid.rolpassword` and
//! accepts in `CREATE ROLE … PASSWORD` (RFC 5803):
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, Base64 with
//! padding, where `SaltedPassword = PBKDF2-HMAC-SHA-256(password, salt,
//! iterations)`, `StoredKey = SHA-256(HMAC(SaltedPassword, "Client Key"))` and
//! `ServerKey = HMAC(SaltedPassword, "Server Key")`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use dvmm_core::config::Secret;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng as _;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// PostgreSQL's default (`scram_iterations`), also what psql's `\password` uses.
pub const SCRAM_ITERATIONS: u32 = 4096;

/// Length of the random salt, as PostgreSQL's own verifiers.
pub const SCRAM_SALT_LEN: usize = 16;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one output block, which is all 32 bytes need.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()]);
    let mut result = u;
    for _ in 1..iterations {
        u = hmac(password, &[&u]);
        result.iter_mut().zip(u).for_each(|(r, b)| *r ^= b);
    }
    result
}

/// The bytes PostgreSQL derives the keys from: the password after SASLprep
/// (RFC 4013), or as it is when SASLprep refuses it (prohibited characters),
/// which is what the server and libpq do.
fn normalized(password: &str) -> Vec<u8> {
    if password.is_ascii() {
        return password.as_bytes().to_vec();
    }
    match stringprep::saslprep(password) {
        Ok(prepared) => prepared.as_bytes().to_vec(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

/// The SCRAM-SHA-256 verifier of `password` with `salt` and `iterations`.
///
/// Deterministic, for checking a verifier against one the server computed;
/// [`scram_sha256_verifier`] draws a fresh salt.
pub fn scram_sha256_verifier_with(password: &Secret, salt: &[u8], iterations: u32) -> String {
    let salted = salted_password(&normalized(password.expose()), salt, iterations.max(1));
    let client_key = hmac(&salted, &[b"Client Key"]);
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, &[b"Server Key"]);
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        BASE64.encode(salt),
        BASE64.encode(stored_key),
        BASE64.encode(server_key)
    )
}

/// A SCRAM-SHA-256 verifier of `password` with a fresh random 16-byte salt
/// from the operating system and 4096 iterations, as psql's `\password`
/// computes it. PostgreSQL stores such a string as it is, and a client that
/// knows the password logs in with SCRAM.
pub fn scram_sha256_verifier(password: &Secret) -> String {
    let mut salt = [0u8; SCRAM_SALT_LEN];
    // The operating system's generator, as before; a failure to read it
    // panics, as `OsRng` did.
    rand::rand_core::UnwrapErr(rand::rngs::SysRng).fill_bytes(&mut salt);
    scram_sha256_verifier_with(password, &salt, SCRAM_ITERATIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values computed independently, with Python's
    /// `hashlib.pbkdf2_hmac`, `hmac` and `base64`.
    #[test]
    fn matches_an_independent_computation() {
        let salt: Vec<u8> = (0..16).collect();
        assert_eq!(
            scram_sha256_verifier_with(&Secret::new("pencil"), &salt, 4096),
            "SCRAM-SHA-256$4096:AAECAwQFBgcICQoLDA0ODw==$zHCdol2044/ZyWzPLi7oxApCkamKw9Z+E4U/QApd/5Y=:dd5peBOitVnLNFu7VmwP+HiDaaw4OUCv396eVCWhYiE="
        );
        // SASLprep maps compatibility characters (NFKC): "Ⅸ-ﬁ" is "IX-fi".
        let expected = "SCRAM-SHA-256$4096:AAECAwQFBgcICQoLDA0ODw==$lAWG36PFmS0DTF6jIRDGFQEDsk1glOOkycQ76pUV+hU=:fQfZU6pwqjDHnOClKt7g4SYmCq5TxxPweZOF0YDVwAM=";
        assert_eq!(
            scram_sha256_verifier_with(&Secret::new("Ⅸ-ﬁ"), &salt, 4096),
            expected
        );
        assert_eq!(
            scram_sha256_verifier_with(&Secret::new("IX-fi"), &salt, 4096),
            expected
        );
    }

    #[test]
    fn fresh_verifiers_have_the_format_and_a_new_salt_each() {
        let password = Secret::new("correct horse");
        let (a, b) = (
            scram_sha256_verifier(&password),
            scram_sha256_verifier(&password),
        );
        assert_ne!(a, b, "the salt is random");
        for v in [&a, &b] {
            let rest = v.strip_prefix("SCRAM-SHA-256$4096:").expect("prefix");
            let (salt, keys) = rest.split_once('$').expect("salt$keys");
            assert_eq!(BASE64.decode(salt).expect("base64").len(), 16);
            let (stored, server) = keys.split_once(':').expect("stored:server");
            assert_eq!(BASE64.decode(stored).expect("base64").len(), 32);
            assert_eq!(BASE64.decode(server).expect("base64").len(), 32);
            assert!(!v.contains("correct horse"));
        }
    }
}
