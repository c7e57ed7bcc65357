//! Random identifiers for files, batches and responses.
//!
//! These come from the thread RNG, not from [`super::SimConfig::seed`]: a daemon keeps ids in its
//! database across simulator restarts, so two runs with the same seed must not hand out the same
//! file or batch ids.

use rand::RngExt;

/// Returns `n_bytes` random bytes as lowercase hex.
pub(super) fn random_hex(n_bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..n_bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// Returns a random version-4 UUID in its usual 8-4-4-4-12 hex form.
pub(super) fn uuid_v4() -> String {
    let mut bits: u128 = rand::rng().random();
    // Set the version (4) and variant (10xx) bits so that UUID parsers accept the id.
    bits = (bits & !(0xf << 76)) | (0x4 << 76);
    bits = (bits & !(0x3 << 62)) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_v4_has_version_and_variant() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(
            matches!(&id[19..20], "8" | "9" | "a" | "b"),
            "variant in {id}"
        );
    }

    #[test]
    fn random_hex_has_two_digits_per_byte() {
        assert_eq!(random_hex(8).len(), 16);
    }
}
