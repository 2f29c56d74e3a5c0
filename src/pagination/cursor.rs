//! Opaque pagination cursors: what `keyset_page` hands out as `next_cursor` / `prev_cursor` and accepts
//! back as `cursor`.
//!
//! Pure Rust, no backend needed. A cursor is base64url (no padding) of
//!
//! ```text
//! version u8 | fingerprint [8] | direction u8 | count u16 | count x (present u8 [| len u32 | utf8]) | tag [16]
//! ```
//!
//! - `fingerprint` is SHA-256 (truncated) of the relation OID, the complete order (tie-breaker
//!   included) and the filter: a cursor only continues the listing it was made for.
//! - the key values are the sort-key columns of the row the cursor points at, as the column types'
//!   text output, so they go back into the query as bound parameters of the column's own type.
//! - `tag` is HMAC-SHA256 over everything before it, keyed by the database's secret
//!   (`tenant_scale.cursor_secret`): a client can read a cursor but cannot make or alter one, so an
//!   altered cursor is refused instead of seeking to a position of the client's choosing.
//!
//! Invariant: `decode` accepts exactly what `encode` produced with the same secret and fingerprint;
//! every other input is a [`CursorError`], which the caller reports as SQLSTATE 22023.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::order::OrderItem;

/// Bumped whenever the layout or the meaning of a field changes; older cursors are then refused with
/// a hint to start again from the first page.
pub(crate) const VERSION: u8 = 1;
const FINGERPRINT_LEN: usize = 8;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + FINGERPRINT_LEN + 1 + 2;

pub(crate) type Fingerprint = [u8; FINGERPRINT_LEN];

/// Which side of the key row the page lies on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Rows after the key row in the listing's order (a `next_cursor`).
    After,
    /// Rows before the key row (a `prev_cursor`).
    Before,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub direction: Direction,
    /// One text value per sort key, `None` for SQL NULL.
    pub key: Vec<Option<String>>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CursorError {
    NotBase64,
    Malformed,
    UnsupportedVersion(u8),
    Altered,
    Foreign,
}

impl CursorError {
    /// The DETAIL line of the 22023 error.
    pub fn detail(&self) -> String {
        match self {
            CursorError::NotBase64 => "The cursor is not base64url text.".to_string(),
            CursorError::Malformed => "The cursor is truncated or malformed.".to_string(),
            CursorError::UnsupportedVersion(version) => {
                format!(
                    "The cursor has format version {version}; this version of tenant_scale reads version {VERSION}."
                )
            }
            CursorError::Altered => "The cursor was altered, or was made by another database.".to_string(),
            CursorError::Foreign => {
                "The cursor was made for another relation, order_by or filter.".to_string()
            }
        }
    }
}

impl fmt::Display for CursorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail())
    }
}

/// Identifies a listing: the relation, its complete order and its filter (as `(column, value)` pairs
/// in a canonical order, `None` for a NULL value).
pub(crate) fn fingerprint(
    relation: u32,
    order: &[OrderItem],
    filter: &[(String, Option<String>)],
) -> Fingerprint {
    let mut hash = Sha256::new();
    hash.update(b"tenant_scale keyset listing\0");
    hash.update(relation.to_be_bytes());
    hash.update((order.len() as u32).to_be_bytes());
    for item in order {
        hash_text(&mut hash, Some(&item.column));
        hash.update([u8::from(item.descending), u8::from(item.nulls_first)]);
    }
    hash.update((filter.len() as u32).to_be_bytes());
    for (column, value) in filter {
        hash_text(&mut hash, Some(column));
        hash_text(&mut hash, value.as_deref());
    }
    let digest = hash.finalize();
    let mut fingerprint = [0; FINGERPRINT_LEN];
    fingerprint.copy_from_slice(&digest[..FINGERPRINT_LEN]);
    fingerprint
}

/// Length-prefixed, so that no two different sequences hash alike.
fn hash_text(hash: &mut Sha256, text: Option<&str>) {
    match text {
        None => hash.update([0]),
        Some(text) => {
            hash.update([1]);
            hash.update((text.len() as u64).to_be_bytes());
            hash.update(text.as_bytes());
        }
    }
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC accepts keys of any length")
}

impl Cursor {
    pub fn encode(&self, secret: &[u8], fingerprint: &Fingerprint) -> String {
        let mut bytes = Vec::with_capacity(HEADER_LEN + TAG_LEN + self.key.len() * 16);
        bytes.push(VERSION);
        bytes.extend_from_slice(fingerprint);
        bytes.push(match self.direction {
            Direction::After => 0,
            Direction::Before => 1,
        });
        bytes.extend_from_slice(&(self.key.len() as u16).to_be_bytes());
        for value in &self.key {
            match value {
                None => bytes.push(0),
                Some(text) => {
                    bytes.push(1);
                    bytes.extend_from_slice(&(text.len() as u32).to_be_bytes());
                    bytes.extend_from_slice(text.as_bytes());
                }
            }
        }
        let mut tag = mac(secret);
        tag.update(&bytes);
        bytes.extend_from_slice(&tag.finalize().into_bytes()[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub fn decode(text: &str, secret: &[u8], fingerprint: &Fingerprint) -> Result<Cursor, CursorError> {
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| CursorError::NotBase64)?;
        if bytes.len() < HEADER_LEN + TAG_LEN {
            return Err(CursorError::Malformed);
        }
        if bytes[0] != VERSION {
            return Err(CursorError::UnsupportedVersion(bytes[0]));
        }
        let (body, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        let mut expected = mac(secret);
        expected.update(body);
        expected.verify_truncated_left(tag).map_err(|_| CursorError::Altered)?;
        if body[1..=FINGERPRINT_LEN] != fingerprint[..] {
            return Err(CursorError::Foreign);
        }
        let direction = match body[1 + FINGERPRINT_LEN] {
            0 => Direction::After,
            1 => Direction::Before,
            _ => return Err(CursorError::Malformed),
        };
        let count = u16::from_be_bytes([body[HEADER_LEN - 2], body[HEADER_LEN - 1]]) as usize;
        let mut rest = &body[HEADER_LEN..];
        let mut key = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            let (&present, after) = rest.split_first().ok_or(CursorError::Malformed)?;
            rest = after;
            match present {
                0 => key.push(None),
                1 => {
                    let (length, after) = rest.split_at_checked(4).ok_or(CursorError::Malformed)?;
                    let length = u32::from_be_bytes(length.try_into().map_err(|_| CursorError::Malformed)?);
                    let (value, after) =
                        after.split_at_checked(length as usize).ok_or(CursorError::Malformed)?;
                    let value = std::str::from_utf8(value).map_err(|_| CursorError::Malformed)?;
                    key.push(Some(value.to_string()));
                    rest = after;
                }
                _ => return Err(CursorError::Malformed),
            }
        }
        if !rest.is_empty() {
            return Err(CursorError::Malformed);
        }
        Ok(Cursor { direction, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn listing() -> Fingerprint {
        fingerprint(
            16_384,
            &[OrderItem::ascending("created_at"), OrderItem::ascending("id")],
            &[("company_id".to_string(), Some("42".to_string()))],
        )
    }

    fn sample() -> Cursor {
        Cursor {
            direction: Direction::Before,
            key: vec![Some("2024-05-01 10:00:00+00".to_string()), None, Some("ünïcode \"x\"".to_string())],
        }
    }

    #[test]
    fn a_cursor_decodes_to_what_was_encoded() {
        let text = sample().encode(SECRET, &listing());
        assert!(text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{text}");
        assert_eq!(Cursor::decode(&text, SECRET, &listing()), Ok(sample()));
    }

    #[test]
    fn every_single_changed_character_is_refused() {
        let text = sample().encode(SECRET, &listing());
        for position in 0..text.len() {
            let mut altered = text.clone().into_bytes();
            altered[position] = if altered[position] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(altered).unwrap();
            let decoded = Cursor::decode(&altered, SECRET, &listing());
            assert!(decoded.is_err(), "altered at {position}: {decoded:?}");
        }
    }

    #[test]
    fn a_cursor_of_another_listing_or_database_is_refused() {
        let text = sample().encode(SECRET, &listing());
        let other_order = fingerprint(16_384, &[OrderItem::ascending("id")], &[]);
        assert_eq!(Cursor::decode(&text, SECRET, &other_order), Err(CursorError::Foreign));
        let other_filter = fingerprint(
            16_384,
            &[OrderItem::ascending("created_at"), OrderItem::ascending("id")],
            &[("company_id".to_string(), Some("43".to_string()))],
        );
        assert_eq!(Cursor::decode(&text, SECRET, &other_filter), Err(CursorError::Foreign));
        assert_eq!(
            Cursor::decode(&text, b"another database's secret.......", &listing()),
            Err(CursorError::Altered)
        );
    }

    #[test]
    fn garbage_truncation_and_other_versions_are_refused() {
        let text = sample().encode(SECRET, &listing());
        assert_eq!(Cursor::decode("not base64!", SECRET, &listing()), Err(CursorError::NotBase64));
        assert_eq!(Cursor::decode("", SECRET, &listing()), Err(CursorError::Malformed));
        assert_eq!(Cursor::decode(&text[..text.len() - 4], SECRET, &listing()), Err(CursorError::Altered));
        let mut bytes = URL_SAFE_NO_PAD.decode(&text).unwrap();
        bytes[0] = 9;
        assert_eq!(
            Cursor::decode(&URL_SAFE_NO_PAD.encode(bytes), SECRET, &listing()),
            Err(CursorError::UnsupportedVersion(9))
        );
    }

    #[test]
    fn fingerprints_tell_null_from_text_and_keep_item_boundaries() {
        let order = [OrderItem::ascending("id")];
        let null = fingerprint(1, &order, &[("a".to_string(), None)]);
        let empty = fingerprint(1, &order, &[("a".to_string(), Some(String::new()))]);
        assert_ne!(null, empty);
        let split_one = fingerprint(1, &order, &[("ab".to_string(), Some("c".to_string()))]);
        let split_two = fingerprint(1, &order, &[("a".to_string(), Some("bc".to_string()))]);
        assert_ne!(split_one, split_two);
        assert_ne!(fingerprint(1, &order, &[]), fingerprint(2, &order, &[]));
        assert_ne!(fingerprint(1, &order, &[]), fingerprint(1, &[order[0].reversed()], &[]));
    }
}
