//! What PMM1 matching needs on the API's side: the pepper (to find stored values) and a key
//! derived from it for the handles it gives partners. Partner keys are not needed here:
//! partners send tokens. The route is `crate::http::matching`.

use crate::auth::rate::Limit;
use ring::hmac;
use std::time::Duration;

/// What matching needs on the API side: the pepper (for stored values) and a key derived from
/// it for handles. Partner keys are not needed here: partners send tokens.
pub struct Matcher {
    pepper: identity::Pepper,
    handles: hmac::Key,
    pub floor: Duration,
    pub limit: Limit,
}

impl std::fmt::Debug for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matcher").field("floor", &self.floor).field("limit", &self.limit).finish_non_exhaustive()
    }
}

impl Matcher {
    pub fn new(pepper: &[u8], floor: Duration, limit: Limit) -> Self {
        let handle_key = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, pepper), b"PMM1 partner handles");
        Matcher { pepper: identity::Pepper::new(pepper.to_vec()), handles: hmac::Key::new(hmac::HMAC_SHA256, handle_key.as_ref()), floor, limit }
    }

    /// What the match index stores for a token a partner sent: its peppered digest.
    pub(crate) fn stored(&self, token: &[u8; 32]) -> [u8; 32] {
        self.pepper.stored(token)
    }

    /// An opaque, stable handle for (what, partner, value): 32 hex digits.
    pub(crate) fn handle(&self, what: &str, partner: &str, value: &str) -> String {
        let tag = hmac::sign(&self.handles, format!("{what}|{partner}|{value}").as_bytes());
        tag.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Matcher;
    use crate::auth::rate::Limit;
    use std::time::Duration;

    #[test]
    fn handles_are_stable_per_partner_and_opaque() {
        let m = Matcher::new(&[7u8; 32], Duration::ZERO, Limit { rate: 1.0, burst: 1.0 });
        let a = m.handle("member", "p1", "M0000001");
        assert_eq!(a, m.handle("member", "p1", "M0000001"));
        assert_ne!(a, m.handle("member", "p2", "M0000001"));
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
