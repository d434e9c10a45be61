//! W3C Trace Context (`traceparent`, https://www.w3.org/TR/trace-context/): how one change is
//! followed across components. A system of record may send a `traceparent` header with its
//! event; the composer starts a trace when it does not. Each hop that sends something on
//! (a composite version, a published record, a notification, an API request's writes) sends a
//! child: the same trace id, a span id of its own. For sampled traces (the sender's flag; the
//! composer samples those it starts at `TRACE_SAMPLE_RATIO`) components log the trace id
//! (`trace_id`) with each step, so the JSON logs of all of them can be searched for one change.

use rand::RngCore;

/// A parsed `traceparent`: version 00's four fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

/// The header's name (HTTP and Kafka alike).
pub const HEADER: &str = "traceparent";

impl TraceParent {
    /// A new trace, sampled (flag 01), for a request or change that arrived without one.
    pub fn root() -> Self {
        let mut rng = rand::rng();
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        // All zeros is invalid; a random draw of it is astronomically unlikely, but cheap to rule out.
        while trace_id == [0; 16] {
            rng.fill_bytes(&mut trace_id);
        }
        while parent_id == [0; 8] {
            rng.fill_bytes(&mut parent_id);
        }
        TraceParent { trace_id, parent_id, flags: 1 }
    }

    /// A new trace sampled with probability `ratio` (its flag says so): a component logs the
    /// steps of sampled traces only, so that logging every change of a busy pipeline is a choice.
    pub fn root_sampled(ratio: f64) -> Self {
        let sampled = ratio >= 1.0 || (ratio > 0.0 && rand::random::<f64>() < ratio);
        TraceParent { flags: u8::from(sampled), ..Self::root() }
    }

    /// Whether the trace is sampled (flag 01): its steps are logged.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The same trace, a new span: what this hop sends on.
    pub fn child(&self) -> Self {
        let mut parent_id = [0u8; 8];
        while parent_id == [0; 8] {
            rand::rng().fill_bytes(&mut parent_id);
        }
        TraceParent { parent_id, ..*self }
    }

    /// Parses a header value. Per the specification a higher version is read by its first four
    /// fields (it may add more after a dash); version `ff`, upper-case hex, all-zero ids and
    /// anything malformed are `None` (the receiver then starts a trace of its own).
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let bytes = value.as_bytes();
        if bytes.len() < 55 || (bytes.len() > 55 && (value.get(0..2) == Some("00") || bytes[55] != b'-')) {
            return None;
        }
        let version = hex::<1>(value.get(0..2)?)?[0];
        if version == 0xff || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let trace_id = hex::<16>(value.get(3..35)?)?;
        let parent_id = hex::<8>(value.get(36..52)?)?;
        let flags = hex::<1>(value.get(53..55)?)?[0];
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent { trace_id, parent_id, flags })
    }

    /// The trace id as 32 lower-case hex digits (what the logs carry as `trace_id`).
    pub fn trace_id(&self) -> String {
        to_hex(&self.trace_id)
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "00-{}-{}-{:02x}", to_hex(&self.trace_id), to_hex(&self.parent_id), self.flags)
    }
}

/// The trace id of a stored `traceparent` when it is sampled, for logs.
pub fn sampled_trace_id(traceparent: Option<&str>) -> Option<String> {
    traceparent.and_then(TraceParent::parse).filter(TraceParent::sampled).map(|t| t.trace_id())
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_specification_examples() {
        let t = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.flags, 1);
        assert_eq!(t.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        // A future version with an extra field is read by its first four.
        assert!(TraceParent::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-be-like").is_some());
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn sampling_follows_the_ratio() {
        assert!((0..100).all(|_| TraceParent::root_sampled(1.0).sampled()));
        assert!((0..100).all(|_| !TraceParent::root_sampled(0.0).sampled()));
        let sampled = (0..10_000).filter(|_| TraceParent::root_sampled(0.1).sampled()).count();
        assert!((700..1300).contains(&sampled), "{sampled} of 10,000 at 0.1");
    }

    #[test]
    fn a_child_keeps_the_trace_and_changes_the_span() {
        let root = TraceParent::root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.parent_id, root.parent_id);
        assert_eq!(TraceParent::parse(&child.to_string()), Some(child));
    }

    proptest! {
        #[test]
        fn what_it_writes_it_reads(trace in any::<[u8; 16]>(), parent in any::<[u8; 8]>(), flags in any::<u8>()) {
            prop_assume!(trace != [0; 16] && parent != [0; 8]);
            let t = TraceParent { trace_id: trace, parent_id: parent, flags };
            prop_assert_eq!(TraceParent::parse(&t.to_string()), Some(t));
        }

        #[test]
        fn any_header_value_is_read_or_refused_without_panicking(value in ".{0,80}") {
            let _ = TraceParent::parse(&value);
        }

        #[test]
        fn a_changed_character_is_refused_or_read_back_as_written(pos in 0usize..55, c in proptest::char::range('!', '~')) {
            let mut s: Vec<char> = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".chars().collect();
            s[pos] = c;
            let s: String = s.into_iter().collect();
            // (A higher version is read and written as 00, the version this code speaks.)
            if let Some(t) = TraceParent::parse(&s) {
                prop_assert_eq!(&t.to_string()[2..], &s[2..]);
            }
        }
    }
}
