//! SMART scopes for backend services: `system/<Type|*>.<read|write|*>` (SMART v1) and
//! `system/<Type|*>.<cruds>` (SMART v2). Only `system/` scopes exist here: there is no user
//! or patient context in a backend-services token.
//!
//! `AuditEvent` is the operators' scope: a wildcard (`system/*.read`) never covers it; only
//! an explicit `system/AuditEvent.read` (or `.rs`) does.

use std::fmt;

/// What a request does with a resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    /// read, vread, history and operations that return the resource
    Read,
    Search,
    Create,
    Update,
    Delete,
}

impl Interaction {
    fn letter(self) -> char {
        match self {
            Interaction::Read => 'r',
            Interaction::Search => 's',
            Interaction::Create => 'c',
            Interaction::Update => 'u',
            Interaction::Delete => 'd',
        }
    }
}

pub const ADMIN_TYPE: &str = "AuditEvent";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `None` for `*`.
    resource_type: Option<String>,
    /// Permitted interaction letters, from `cruds`.
    permissions: String,
    text: String,
}

impl Scope {
    pub fn parse(raw: &str) -> Option<Scope> {
        let rest = raw.strip_prefix("system/")?;
        let (ty, perms) = rest.split_once('.')?;
        let resource_type = match ty {
            "*" => None,
            t if !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphabetic()) && t.as_bytes()[0].is_ascii_uppercase() => Some(t.to_owned()),
            _ => return None,
        };
        let permissions = match perms {
            "read" => "rs".to_owned(),
            "write" => "cud".to_owned(),
            "*" => "cruds".to_owned(),
            v2 if !v2.is_empty() && is_ordered_subset(v2, "cruds") => v2.to_owned(),
            _ => return None,
        };
        Some(Scope { resource_type, permissions, text: raw.to_owned() })
    }

    /// Whether this scope allows `interaction` on `resource_type`.
    pub fn allows(&self, resource_type: &str, interaction: Interaction) -> bool {
        let type_ok = match &self.resource_type {
            Some(t) => t == resource_type,
            None => resource_type != ADMIN_TYPE,
        };
        type_ok && self.permissions.contains(interaction.letter())
    }

    /// Whether everything `other` allows, this scope allows too (used to grant requested scopes).
    pub fn includes(&self, other: &Scope) -> bool {
        let type_ok = match (&self.resource_type, &other.resource_type) {
            (None, None) => true,
            (None, Some(t)) => t != ADMIN_TYPE,
            (Some(_), None) => false,
            (Some(a), Some(b)) => a == b,
        };
        type_ok && other.permissions.chars().all(|c| self.permissions.contains(c))
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `letters` is non-empty, without repeats, in the order of `order` (SMART v2 requires `cruds` order).
fn is_ordered_subset(letters: &str, order: &str) -> bool {
    let mut rest = order.chars();
    letters.chars().all(|c| rest.by_ref().any(|o| o == c))
}

/// A set of granted scopes.
#[derive(Debug, Clone, Default)]
pub struct Scopes(Vec<Scope>);

impl Scopes {
    /// Parses stored scope strings, skipping any that are not understood.
    pub fn from_strings(raw: &[String]) -> Scopes {
        Scopes(raw.iter().filter_map(|s| Scope::parse(s)).collect())
    }

    pub fn allows(&self, resource_type: &str, interaction: Interaction) -> bool {
        self.0.iter().any(|s| s.allows(resource_type, interaction))
    }

    /// The requested scopes this set includes, or the first one it does not.
    pub fn grant(&self, requested: &[Scope]) -> Result<Vec<Scope>, String> {
        let mut granted: Vec<Scope> = Vec::new();
        for r in requested {
            if !self.0.iter().any(|a| a.includes(r)) {
                return Err(r.to_string());
            }
            if !granted.contains(r) {
                granted.push(r.clone());
            }
        }
        Ok(granted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(raw: &str) -> Scope {
        Scope::parse(raw).unwrap_or_else(|| panic!("{raw} parses"))
    }

    #[test]
    fn v1_and_v2_forms() {
        assert!(s("system/Patient.read").allows("Patient", Interaction::Read));
        assert!(s("system/Patient.read").allows("Patient", Interaction::Search));
        assert!(!s("system/Patient.read").allows("Patient", Interaction::Create));
        assert!(s("system/*.read").allows("Task", Interaction::Read));
        assert!(s("system/Patient.rs").allows("Patient", Interaction::Search));
        assert!(!s("system/Patient.r").allows("Patient", Interaction::Search));
        assert!(s("system/MedicationStatement.write").allows("MedicationStatement", Interaction::Update));
        assert!(s("system/MedicationStatement.cu").allows("MedicationStatement", Interaction::Create));
        for bad in [
            "patient/Patient.read",
            "system/Patient",
            "system/patient.read",
            "system/Patient.rr",
            "system/Patient.sr",
            "system/.read",
            "system/Patient.x",
        ] {
            assert!(Scope::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn audit_events_need_the_explicit_admin_scope() {
        assert!(!s("system/*.read").allows(ADMIN_TYPE, Interaction::Read));
        assert!(!s("system/*.*").allows(ADMIN_TYPE, Interaction::Search));
        assert!(s("system/AuditEvent.read").allows(ADMIN_TYPE, Interaction::Search));
        assert!(!s("system/*.read").includes(&s("system/AuditEvent.read")));
    }

    #[test]
    fn granting_needs_an_including_allowed_scope() {
        let allowed = Scopes::from_strings(&["system/*.read".to_owned(), "system/MedicationStatement.write".to_owned()]);
        assert_eq!(allowed.grant(&[s("system/Patient.read"), s("system/Patient.rs")]).map(|g| g.len()), Ok(2));
        assert_eq!(allowed.grant(&[s("system/MedicationStatement.c")]).map(|g| g.len()), Ok(1));
        assert_eq!(allowed.grant(&[s("system/Patient.write")]), Err("system/Patient.write".to_owned()));
        assert_eq!(allowed.grant(&[s("system/*.*")]), Err("system/*.*".to_owned()));
    }
}
