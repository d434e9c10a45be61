//! Domain types: parsed at the edge, so invalid values are unrepresentable past it.

use std::fmt;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("{what} must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '.' or '_' (got {len} characters)")]
    BadIdentifier { what: &'static str, len: usize },
    #[error("version must be a non-negative integer")]
    BadVersion,
}

/// FHIR ids are `[A-Za-z0-9\-\.]{1,64}`; we also allow `_` in record ids coming from systems
/// of record, and map it for FHIR where needed.
fn parse_identifier(what: &'static str, raw: &str, allow_underscore: bool) -> Result<String, DomainError> {
    let ok = !raw.is_empty()
        && raw.len() <= 64
        && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || (allow_underscore && b == b'_'));
    if ok { Ok(raw.to_owned()) } else { Err(DomainError::BadIdentifier { what, len: raw.chars().count() }) }
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $what:literal, $underscore:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn parse(raw: &str) -> Result<Self, DomainError> {
                parse_identifier($what, raw, $underscore).map(Self)
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

identifier!(
    /// A member of the plan; also the id of the member's `Patient`. May be logged.
    MemberId, "member_id", false
);
identifier!(
    /// A record's id within its system of record.
    RecordId, "record_id", true
);
identifier!(
    /// A system of record (`rx-claims`, `emr`, …): the `source` of an event.
    SourceName, "source", true
);
identifier!(
    /// A partner organisation (clinic, physician group, app).
    PartnerId, "partner_id", false
);

/// Monotonic per (`source`, `record_id`): native `version`, or the Debezium source position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordVersion(i64);

impl RecordVersion {
    pub fn new(value: i64) -> Result<Self, DomainError> {
        if value >= 0 { Ok(Self(value)) } else { Err(DomainError::BadVersion) }
    }
    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for RecordVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn member_ids() {
        assert!(MemberId::parse("M0001234").is_ok());
        assert!(MemberId::parse("").is_err());
        assert!(MemberId::parse("M 1").is_err());
        assert!(MemberId::parse("M_1").is_err());
        assert!(RecordId::parse("RX_1").is_ok());
        assert!(MemberId::parse(&"a".repeat(65)).is_err());
    }

    proptest! {
        #[test]
        fn parsed_member_ids_are_valid_fhir_ids(raw in ".{0,80}") {
            if let Ok(id) = MemberId::parse(&raw) {
                prop_assert!(id.as_str().len() <= 64);
                prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
            }
        }

        #[test]
        fn versions_are_never_negative(v in any::<i64>()) {
            prop_assert_eq!(RecordVersion::new(v).is_ok(), v >= 0);
        }
    }
}
