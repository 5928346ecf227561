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

/// Authenticated encryption (ChaCha20-Poly1305) for secrets the server must
/// be able to read back, such as the latest reset passcode. Each value gets
/// a fresh random nonce; `context` binds it to its record (a value copied
/// into another record does not decrypt).
pub struct SecretBox {
    cipher: chacha20poly1305::ChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    pub fn new(key: &[u8; 32]) -> Self {
        use chacha20poly1305::KeyInit;
        Self {
            cipher: chacha20poly1305::ChaCha20Poly1305::new(key.into()),
        }
    }

    /// `hex(nonce || ciphertext)`.
    pub fn seal(&self, plaintext: &str, context: &str) -> String {
        use chacha20poly1305::aead::{Aead, Payload};
        let nonce: [u8; 12] = os_random();
        let sealed = self
            .cipher
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .expect("encryption of an in-memory buffer cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        hex::encode(out)
    }

    /// The plaintext, or None when the value was tampered with or belongs
    /// to another context.
    pub fn open(&self, sealed: &str, context: &str) -> Option<Zeroizing<String>> {
        use chacha20poly1305::aead::{Aead, Payload};
        let bytes = hex::decode(sealed).ok()?;
        if bytes.len() < 12 {
            return None;
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let plain = self
            .cipher
            .decrypt(
                nonce.into(),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .ok()?;
        String::from_utf8(plain).ok().map(Zeroizing::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_in_their_context() {
        let keys = ServerKeys::new(Zeroizing::new([7u8; 32]));
        let sealed_box = SecretBox::new(&keys.derive("test"));
        let sealed = sealed_box.seal("12345678", "device:dv_1");
        assert!(!sealed.contains("12345678"));
        assert_eq!(
            sealed_box
                .open(&sealed, "device:dv_1")
                .expect("opens")
                .as_str(),
            "12345678"
        );
        assert!(sealed_box.open(&sealed, "device:dv_2").is_none());
        let mut tampered = sealed.clone();
        tampered.replace_range(30..31, if &sealed[30..31] == "0" { "1" } else { "0" });
        assert!(sealed_box.open(&tampered, "device:dv_1").is_none());
        assert_ne!(
            sealed_box.seal("12345678", "device:dv_1"),
            sealed,
            "fresh nonce each time"
        );
    }
}
