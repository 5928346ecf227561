//! Randomness and keyed hashing from the server secret.

use hmac::{Hmac, Mac};
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::Sha256;
use zeroize::Zeroizing;

/// `N` bytes straight from the operating system's CSPRNG.
pub fn os_random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the operating system's random source failed");
    bytes
}

/// Keys derived from the server secret, one per purpose, so a key used for
/// one thing never doubles as another.
pub struct ServerKeys {
    secret: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for ServerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerKeys(..)")
    }
}

impl ServerKeys {
    pub fn new(secret: Zeroizing<[u8; 32]>) -> Self {
        Self { secret }
    }

    /// A 32-byte key for `purpose`: HMAC-SHA256(secret, purpose).
    pub fn derive(&self, purpose: &str) -> Zeroizing<[u8; 32]> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret.as_slice())
            .expect("HMAC takes keys of any length");
        mac.update(purpose.as_bytes());
        Zeroizing::new(mac.finalize().into_bytes().into())
    }
}
