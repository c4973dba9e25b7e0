//! Key-value keys from arbitrary ids.

use base64::Engine;

/// The longest key-value key or object-store token the core's store
/// wrappers send to NATS. A key is a token of the subject it is read and
/// written on, and a NATS server closes a connection whose protocol line
/// (subject, reply inbox, sizes) is longer than its `max_control_line`
/// (4 KiB by default), taking every room's in-flight work on that
/// connection with it. So `nats::Kv` / `nats::Objects` refuse to write a
/// longer key, and report it absent on reads (it can never have been
/// written). 2 KiB leaves room for the rest of the line and bucket names.
pub const MAX_KEY_BYTES: usize = 2048;

/// The longest id a room should accept in a payload when the id becomes a
/// key: encoded by [`kv_key`] (at most 4/3 as long), even two of them in
/// one key stay under [`MAX_KEY_BYTES`]. Longer ids are `payload_invalid`.
pub const MAX_ID_BYTES: usize = 512;

/// Why `id` cannot become a key (`"must be at most 512 bytes"`), for a
/// room's `payload_invalid` / 400 naming the field; `None` when it can.
pub fn id_too_long(id: &str) -> Option<String> {
    (id.len() > MAX_ID_BYTES).then(|| format!("must be at most {MAX_ID_BYTES} bytes"))
}

/// JetStream key-value keys allow `[-/_=.a-zA-Z0-9]`. Ids made of letters,
/// digits, `-` and `_` are used as they are (readable with `nats kv get`);
/// anything else is base64url-encoded behind a `=`, which a plain id cannot
/// start with, so two ids never share a key.
pub fn kv_key(id: &str) -> String {
    let plain = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        id.to_string()
    } else {
        format!(
            "={}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id)
        )
    }
}

/// The id a key was made from by [`kv_key`].
pub fn id_from_kv_key(key: &str) -> Option<String> {
    match key.strip_prefix('=') {
        Some(encoded) => base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok()),
        None => Some(key.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_and_unambiguous() {
        assert_eq!(kv_key("doc-1_a"), "doc-1_a");
        let odd = kv_key("docs/readme.md");
        assert!(odd.starts_with('='));
        assert!(
            odd[1..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_ne!(kv_key("=x"), "=x");
        for id in ["doc-1_a", "docs/readme.md", "=x", "crème brûlée"] {
            assert_eq!(id_from_kv_key(&kv_key(id)).as_deref(), Some(id));
        }
    }

    #[test]
    fn two_ids_of_the_longest_accepted_size_fit_in_one_key() {
        let id = "é".repeat(MAX_ID_BYTES / 2);
        assert_eq!(id.len(), MAX_ID_BYTES);
        let two = format!("d.{}.{}", kv_key(&id), kv_key(&id));
        assert!(two.len() <= MAX_KEY_BYTES, "{}", two.len());
    }
}
