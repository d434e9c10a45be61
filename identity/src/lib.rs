//! PMM1: privacy-preserving member matching, byte for byte as ../shared/identity/PMM1.md
//! specifies. A partner normalizes a patient's identity, builds up to five token messages and
//! keys them with its partner key; the platform stores only peppered digests of tokens.
//!
//! Nothing here logs, and no type here implements `Display` for keys or identities.

pub mod normalize;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::fmt;

type HmacSha256 = Hmac<Sha256>;

/// The seven points of identity as a partner or a system of record has them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub given: String,
    pub family: String,
    /// `YYYY-MM-DD`
    pub birth_date: String,
    /// FHIR gender: `male`, `female`, …
    pub gender: String,
    pub line1: String,
    pub postal_code: String,
    pub phone: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Identity(…)") // PHI: never printed
    }
}

/// The normalized fields; `None` where missing.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Normalized {
    pub first: Option<String>,
    pub last: Option<String>,
    pub dob: Option<String>,
    pub sex: Option<String>,
    pub zip5: Option<String>,
    pub house: Option<String>,
    pub phone: Option<String>,
}

impl fmt::Debug for Normalized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Normalized(…)")
    }
}

impl Normalized {
    pub fn of(identity: &Identity) -> Self {
        Self {
            first: normalize::first_name(&identity.given),
            last: normalize::last_name(&identity.family),
            dob: normalize::birth_date_today(&identity.birth_date),
            sex: normalize::sex(&identity.gender),
            zip5: normalize::zip5(&identity.postal_code),
            house: normalize::house_key(&identity.line1),
            phone: normalize::phone(&identity.phone),
        }
    }
}

/// The five token types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenType {
    T1,
    T2,
    T3,
    T4,
    T5,
}

impl TokenType {
    pub const ALL: [TokenType; 5] = [TokenType::T1, TokenType::T2, TokenType::T3, TokenType::T4, TokenType::T5];

    pub fn name(self) -> &'static str {
        match self {
            TokenType::T1 => "T1",
            TokenType::T2 => "T2",
            TokenType::T3 => "T3",
            TokenType::T4 => "T4",
            TokenType::T5 => "T5",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// The message of a token type, `PMM1|<id>|<field>|…`, when every field it needs is present.
pub fn message(t: TokenType, n: &Normalized) -> Option<String> {
    let first_letter = || n.first.as_ref().and_then(|f| f.get(..1)).map(str::to_owned);
    let soundex = |v: &Option<String>| v.as_deref().and_then(normalize::soundex);
    let fields: Vec<Option<String>> = match t {
        TokenType::T1 => vec![n.last.clone(), n.first.clone(), n.dob.clone(), n.sex.clone(), n.zip5.clone()],
        TokenType::T2 => vec![n.last.clone(), first_letter(), n.dob.clone(), n.sex.clone()],
        TokenType::T3 => vec![soundex(&n.last), soundex(&n.first), n.dob.clone(), n.sex.clone()],
        TokenType::T4 => vec![n.first.clone(), n.dob.clone(), n.sex.clone(), n.house.clone(), n.zip5.clone()],
        TokenType::T5 => vec![n.last.clone(), n.first.clone(), n.dob.clone(), n.phone.clone()],
    };
    let fields: Option<Vec<String>> = fields.into_iter().collect();
    fields.map(|f| format!("PMM1|{}|{}", t.name(), f.join("|")))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// A partner's key for a key id: HKDF-SHA256(master, salt "PMM1", info "partner:<key id>").
#[derive(Clone)]
pub struct PartnerKey([u8; 32]);

impl PartnerKey {
    pub fn derive(master: &[u8], key_id: &str) -> Self {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"PMM1"), master);
        let mut okm = [0u8; 32];
        hk.expand(format!("partner:{key_id}").as_bytes(), &mut okm).expect("32 bytes is a valid HKDF-SHA256 length");
        Self(okm)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Lowercase hex, for the operator to hand to the partner out of band.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The token of a message: HMAC-SHA256(partner key, message).
    pub fn token(&self, message: &str) -> [u8; 32] {
        hmac(&self.0, message.as_bytes())
    }
}

impl fmt::Debug for PartnerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PartnerKey(…)")
    }
}

/// The platform's pepper: what it stores is HMAC-SHA256(pepper, token bytes).
#[derive(Clone)]
pub struct Pepper(Vec<u8>);

impl Pepper {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn stored(&self, token: &[u8; 32]) -> [u8; 32] {
        hmac(&self.0, token)
    }
}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pepper(…)")
    }
}

/// Every token a partner can make for an identity: (type, token).
pub fn tokens(key: &PartnerKey, n: &Normalized) -> Vec<(TokenType, [u8; 32])> {
    TokenType::ALL.into_iter().filter_map(|t| message(t, n).map(|m| (t, key.token(&m)))).collect()
}

#[cfg(test)]
mod tests;
