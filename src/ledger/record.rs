//! On-disk record framing.
//!
//! ```text
//! frame  = len:u32le | header (98 bytes, clear, AEAD associated data) | ciphertext | tag (16)
//! header = magic:u8 | type:u8 | seq:u64be | time_us:i64be | key_id:u32be | nonce:[12]
//!          | blind:[32] | prev:[32]
//! hash   = SHA-256(header | ciphertext | tag)      -- the next record's `prev`
//! ```
//! The length prefix is outside the hash on purpose: changing it breaks framing, which the
//! reader detects anyway, and keeping it out lets the hash be computed over one contiguous slice.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Nonce, Tag};
use sha2::{Digest, Sha256};

use super::error::LedgerError;
use super::keys::Keyring;

pub(crate) const MAGIC: u8 = 0xC1;
pub(crate) const HEADER_LEN: usize = 98;
pub(crate) const LEN_PREFIX: usize = 4;
pub(crate) const TAG_LEN: usize = 16;
/// Upper bound on one frame body; anything larger is treated as corruption, not allocated.
pub(crate) const MAX_BODY: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub entry_type: u8,
    pub seq: u64,
    pub time_us: i64,
    pub key_id: u32,
    pub nonce: [u8; 12],
    pub blind: [u8; 32],
    pub prev: [u8; 32],
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = MAGIC;
        b[1] = self.entry_type;
        b[2..10].copy_from_slice(&self.seq.to_be_bytes());
        b[10..18].copy_from_slice(&self.time_us.to_be_bytes());
        b[18..22].copy_from_slice(&self.key_id.to_be_bytes());
        b[22..34].copy_from_slice(&self.nonce);
        b[34..66].copy_from_slice(&self.blind);
        b[66..98].copy_from_slice(&self.prev);
        b
    }

    pub fn decode(b: &[u8]) -> Option<Header> {
        let b: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        if b[0] != MAGIC || !(1..=3).contains(&b[1]) {
            return None;
        }
        Some(Header {
            entry_type: b[1],
            seq: u64::from_be_bytes(b[2..10].try_into().ok()?),
            time_us: i64::from_be_bytes(b[10..18].try_into().ok()?),
            key_id: u32::from_be_bytes(b[18..22].try_into().ok()?),
            nonce: b[22..34].try_into().ok()?,
            blind: b[34..66].try_into().ok()?,
            prev: b[66..98].try_into().ok()?,
        })
    }

    /// The boot counter half of the nonce (see `writer`).
    pub fn boot(&self) -> u32 {
        u32::from_be_bytes([self.nonce[0], self.nonce[1], self.nonce[2], self.nonce[3]])
    }
}

pub(crate) struct RawFrame<'a> {
    pub header: Header,
    /// header | ciphertext | tag
    pub body: &'a [u8],
    pub end: usize,
}

impl RawFrame<'_> {
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.body).into()
    }

    pub fn decrypt(&self, keys: &Keyring) -> Result<Vec<u8>, LedgerError> {
        let cipher = keys
            .cipher(self.header.key_id)
            .ok_or(LedgerError::UnknownKey(self.header.key_id))?;
        let (aad, rest) = self.body.split_at(HEADER_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut buf = ct.to_vec();
        cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&self.header.nonce),
                aad,
                &mut buf,
                Tag::from_slice(tag),
            )
            .map_err(|_| LedgerError::Crypto)?;
        Ok(buf)
    }
}

pub(crate) enum Next<'a> {
    Frame(RawFrame<'a>),
    /// Clean end of data.
    End,
    /// The data stops inside a frame (a torn write).
    Torn,
    /// A structurally invalid frame (bad length or header).
    Bad,
}

pub(crate) fn next_frame(buf: &[u8], off: usize) -> Next<'_> {
    let Some(rest) = buf.get(off..) else {
        return Next::Bad;
    };
    if rest.is_empty() {
        return Next::End;
    }
    let Some(len_bytes) = rest.get(..LEN_PREFIX) else {
        return Next::Torn;
    };
    let len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
    if !(HEADER_LEN + TAG_LEN..=MAX_BODY).contains(&len) {
        return Next::Bad;
    }
    let Some(body) = rest.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Next::Torn;
    };
    match Header::decode(body) {
        Some(header) => Next::Frame(RawFrame {
            header,
            body,
            end: off + LEN_PREFIX + len,
        }),
        None => Next::Bad,
    }
}

/// Encrypts `plaintext` in place and appends the whole frame to `out`; returns the record hash.
pub(crate) fn seal(
    keys: &Keyring,
    header: &Header,
    plaintext: &mut [u8],
    out: &mut Vec<u8>,
) -> Result<[u8; 32], LedgerError> {
    let cipher = keys
        .cipher(header.key_id)
        .ok_or(LedgerError::UnknownKey(header.key_id))?;
    let hdr = header.encode();
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&header.nonce), &hdr, plaintext)
        .map_err(|_| LedgerError::Crypto)?;
    let len = HEADER_LEN + plaintext.len() + TAG_LEN;
    if len > MAX_BODY {
        return Err(LedgerError::Config(format!(
            "record of {len} bytes exceeds the {MAX_BODY}-byte limit"
        )));
    }
    out.extend_from_slice(&(len as u32).to_le_bytes());
    let start = out.len();
    out.extend_from_slice(&hdr);
    out.extend_from_slice(plaintext);
    out.extend_from_slice(&tag);
    Ok(Sha256::digest(&out[start..]).into())
}
