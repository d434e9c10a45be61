//! The client side of SMART Backend Services, for the `partners` command (demo tokens) and the
//! tests: a partner's signing key, its public JWK, and signed client assertions.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use time::OffsetDateTime;

pub struct ClientKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    /// The public key as a JWK (what the partner registers).
    pub jwk: Value,
}

impl ClientKey {
    /// A new P-384 key; returns it with its PKCS#8 DER (to keep it for later runs).
    pub fn generate_es384(kid: &str) -> anyhow::Result<(ClientKey, Vec<u8>)> {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("cannot generate a P-384 key"))?;
        let der = pkcs8.as_ref().to_vec();
        Ok((ClientKey::es384_from_pkcs8(kid, &der)?, der))
    }

    pub fn es384_from_pkcs8(kid: &str, der: &[u8]) -> anyhow::Result<ClientKey> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, der, &SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("not a P-384 PKCS#8 key"))?;
        let point = pair.public_key().as_ref(); // 0x04 || x || y
        anyhow::ensure!(point.len() == 97 && point[0] == 4, "unexpected P-384 public key encoding");
        let jwk = json!({ "kty": "EC", "crv": "P-384", "alg": "ES384", "use": "sig", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..49]), "y": URL_SAFE_NO_PAD.encode(&point[49..]) });
        Ok(ClientKey { kid: kid.to_owned(), alg: Algorithm::ES384, encoding: EncodingKey::from_ec_der(der), jwk })
    }

    /// An RSA key from its PEM and its modulus (big-endian bytes); the exponent is 65537.
    pub fn rs384_from_pem(kid: &str, pem: &[u8], modulus: &[u8]) -> anyhow::Result<ClientKey> {
        let encoding = EncodingKey::from_rsa_pem(pem)?;
        let jwk = json!({ "kty": "RSA", "alg": "RS384", "use": "sig", "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(modulus), "e": "AQAB" });
        Ok(ClientKey { kid: kid.to_owned(), alg: Algorithm::RS384, encoding, jwk })
    }

    /// A JWK Set of these keys' public halves.
    pub fn jwks(keys: &[&ClientKey]) -> Value {
        json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
    }

    /// A client assertion for `client_id` at `token_url`, expiring `lifetime_secs` from now
    /// (negative for an expired one, as tests need), with a fresh `jti` unless one is given.
    pub fn assertion(&self, client_id: &str, token_url: &str, lifetime_secs: i64, jti: Option<&str>) -> anyhow::Result<String> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let jti = match jti {
            Some(j) => j.to_owned(),
            None => {
                let mut bytes = [0u8; 16];
                ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut bytes).map_err(|_| anyhow::anyhow!("no randomness"))?;
                URL_SAFE_NO_PAD.encode(bytes)
            }
        };
        let claims = json!({ "iss": client_id, "sub": client_id, "aud": token_url, "exp": now + lifetime_secs, "iat": now, "jti": jti });
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".to_owned());
        Ok(jsonwebtoken::encode(&header, &claims, &self.encoding)?)
    }
}

/// The form body of a token request.
pub fn token_request(assertion: &str, scope: &str) -> String {
    serde_urlencoded::to_string([
        ("grant_type", "client_credentials"),
        ("scope", scope),
        ("client_assertion_type", super::token::ASSERTION_TYPE),
        ("client_assertion", assertion),
    ])
    .unwrap_or_default()
}

/// Checks a JWK Set an operator registers: public RSA or P-384 keys only, at least one.
pub fn check_jwks(jwks: &str) -> Result<(), String> {
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(jwks).map_err(|e| format!("not a JWK Set: {e}"))?;
    if set.keys.is_empty() {
        return Err("the JWK Set has no keys".into());
    }
    let raw: Value = serde_json::from_str(jwks).map_err(|e| e.to_string())?;
    for (i, key) in raw["keys"].as_array().into_iter().flatten().enumerate() {
        if key.get("d").is_some() {
            return Err(format!("key {i} holds a private key ('d'); register only the public key"));
        }
        match (key["kty"].as_str(), key["crv"].as_str()) {
            (Some("RSA"), _) | (Some("EC"), Some("P-384")) => {}
            _ => return Err(format!("key {i}: only RSA (RS384) and EC P-384 (ES384) keys are accepted")),
        }
    }
    Ok(())
}
