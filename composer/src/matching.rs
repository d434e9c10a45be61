//! Keeps the PMM1 match index (../shared/identity/PMM1.md) in step with demographics: for each
//! configured key id, the stored values of each member's tokens. Written in the same
//! transaction as the demographics change, and rebuilt for a new key id by `match-index`.

use db::matching::IndexRow;
use identity::{Identity, Normalized, PartnerKey, Pepper, TokenType};
use serde_json::Value;

/// Partner keys for the configured key ids, and the pepper. Never logged (no `Debug` output
/// of the secrets).
pub struct MatchIndexer {
    keys: Vec<(String, PartnerKey)>,
    pepper: Pepper,
}

impl std::fmt::Debug for MatchIndexer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MatchIndexer").field("key_ids", &self.key_ids()).finish_non_exhaustive()
    }
}

impl MatchIndexer {
    /// From configuration: `None` when PMM1 is not configured (no key ids). A key id without
    /// a master secret and a pepper is a configuration error.
    pub fn from_config(config: &platform::Pmm1Config) -> anyhow::Result<Option<Self>> {
        if config.pmm1_key_ids.is_empty() {
            return Ok(None);
        }
        let master = config.master().map_err(anyhow::Error::msg)?.ok_or_else(|| anyhow::anyhow!("PMM1_KEY_IDS needs PMM1_MASTER_SECRET(_FILE)"))?;
        let pepper = config.pepper().map_err(anyhow::Error::msg)?.ok_or_else(|| anyhow::anyhow!("PMM1_KEY_IDS needs PMM1_PEPPER(_FILE)"))?;
        Ok(Some(Self::new(master.bytes(), pepper.bytes(), &config.pmm1_key_ids)))
    }

    pub fn new(master: &[u8], pepper: &[u8], key_ids: &[String]) -> Self {
        MatchIndexer { keys: key_ids.iter().map(|k| (k.clone(), PartnerKey::derive(master, k))).collect(), pepper: Pepper::new(pepper.to_vec()) }
    }

    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|(k, _)| k.clone()).collect()
    }

    /// The index rows of one member's Patient (as stored) for every key id.
    pub fn rows(&self, member_id: &str, patient_json: &str) -> Vec<IndexRow> {
        let Ok(patient) = serde_json::from_str::<Value>(patient_json) else { return Vec::new() };
        self.rows_of(member_id, &identity_of(&patient))
    }

    /// The index rows of one member's identity for every key id.
    pub fn rows_of(&self, member_id: &str, identity: &Identity) -> Vec<IndexRow> {
        let normalized = Normalized::of(identity);
        let mut rows = Vec::new();
        for (key_id, key) in &self.keys {
            for (token_type, token) in identity::tokens(key, &normalized) {
                rows.push(IndexRow {
                    key_id: key_id.clone(),
                    stored: self.pepper.stored(&token).to_vec(),
                    token_type: type_number(token_type),
                    member_id: member_id.to_owned(),
                });
            }
        }
        rows
    }
}

pub fn type_number(t: TokenType) -> i16 {
    match t {
        TokenType::T1 => 1,
        TokenType::T2 => 2,
        TokenType::T3 => 3,
        TokenType::T4 => 4,
        TokenType::T5 => 5,
    }
}

/// The seven points of identity of a FHIR Patient as the composer maps demographics: the
/// first name, first address line and first phone.
pub fn identity_of(patient: &Value) -> Identity {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let name = &patient["name"][0];
    let address = &patient["address"][0];
    let phone = patient["telecom"].as_array().into_iter().flatten().find(|t| t["system"] == "phone").map(|t| text(&t["value"]));
    Identity {
        given: text(&name["given"][0]),
        family: text(&name["family"]),
        birth_date: text(&patient["birthDate"]),
        gender: text(&patient["gender"]),
        line1: text(&address["line"][0]),
        postal_code: text(&address["postalCode"]),
        phone: phone.unwrap_or_default(),
    }
}

/// Rebuilds the index of `key_id` from the live demographics in PostgreSQL (which hold the
/// current state of `sor.member.demographics.v1`). Returns the members and rows indexed.
pub async fn rebuild(pool: &db::Pool, indexer: &MatchIndexer, key_id: &str) -> anyhow::Result<(usize, usize)> {
    let only = MatchIndexer {
        keys: indexer.keys.iter().filter(|(k, _)| k == key_id).map(|(k, key)| (k.clone(), key.clone())).collect(),
        pepper: indexer.pepper.clone(),
    };
    anyhow::ensure!(!only.keys.is_empty(), "key id {key_id} is not in PMM1_KEY_IDS: add it there (and to the composer's) first");
    let mut rows = Vec::new();
    let mut members = 0;
    let mut after = String::new();
    const PAGE: i64 = 5_000;
    loop {
        let mut page = db::matching::patients_page(pool, &after, PAGE).await?;
        let full = page.len() as i64 == PAGE;
        if full {
            // The last member may continue on the next page (several demographics sources).
            let last = page.last().map(|(m, _)| m.clone()).unwrap_or_default();
            page.retain(|(m, _)| *m != last);
        }
        let Some((last, _)) = page.last() else { break };
        after = last.clone();
        let mut previous = String::new();
        for (member, patient) in &page {
            if *member != previous {
                members += 1;
                previous = member.clone();
            }
            rows.extend(only.rows(member, patient));
        }
        if !full {
            break;
        }
    }
    db::matching::rebuild(pool, key_id, &rows).await?;
    Ok((members, rows.len()))
}
