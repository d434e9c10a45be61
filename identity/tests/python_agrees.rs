//! The Python reference tokenizer (identity/python/pmm1.py) and this crate agree on generated
//! identities: same normalized fields, messages and tokens, including awkward Unicode.

use identity::{Identity, Normalized, PartnerKey, TokenType, message};
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};

/// A small deterministic generator (xorshift), so a failure reproduces.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
    fn text(&mut self, alphabet: &[&str], max: u64) -> String {
        (0..self.next() % (max + 1)).map(|_| self.pick(alphabet)).collect()
    }
}

const NAME_BITS: [&str; 40] = [
    "a", "B", "c", "É", "ñ", "ø", "Æ", "ß", "Ł", "đ", "Þ", "œ", "ı", "ǅ", "ﬁ", "Ａ", "e\u{301}", " ", "  ", "\u{a0}", "\u{2003}", "-", "'", ",", ".",
    "Dr. ", "Mrs ", " Jr.", " III", " Q.", " x", "Baby ", "Boy", "unknown", "José", "O'Neil", "Nguyễn", "\t", "\u{3000}", "9",
];
const LINE_BITS: [&str; 16] =
    ["P.O. Box ", "PO BOX ", "Post Office Box ", "Box ", "00", "12", "7", "A", " Main St", ", Apt 4", "．", " ", "١٢", "St.", "#", "0"];
const DIGIT_BITS: [&str; 14] = ["1", "2", "0", "5", "9", "(", ")", "-", " ", "+", "١", "０", "7", "3"];

#[test]
fn python_and_rust_agree_on_generated_identities() {
    let mut g = Gen(0x9E3779B97F4A7C15);
    let key_hex = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    let key = PartnerKey::from_bytes(hex::decode(key_hex).unwrap().try_into().unwrap());
    let mut identities = Vec::new();
    for _ in 0..3000 {
        let dob = format!("{}-{:02}-{:02}", 1890 + g.next() % 140, g.next() % 14, g.next() % 33);
        identities.push(Identity {
            given: g.text(&NAME_BITS, 6),
            family: g.text(&NAME_BITS, 6),
            birth_date: if g.next().is_multiple_of(5) { g.text(&DIGIT_BITS, 10) } else { dob },
            gender: g.pick(&["male", "female", "other", "unknown", "Male", ""]).to_owned(),
            line1: g.text(&LINE_BITS, 5),
            postal_code: g.text(&DIGIT_BITS, 11),
            phone: g.text(&DIGIT_BITS, 14),
        });
    }
    let input: String = identities
        .iter()
        .map(|i| {
            json!({ "given": i.given, "family": i.family, "birthDate": i.birth_date, "gender": i.gender,
                "line1": i.line1, "postalCode": i.postal_code, "phone": i.phone })
            .to_string()
                + "\n"
        })
        .collect();
    // Tests run in the package's directory (a compile-time path could name another clone).
    let script = "python/pmm1.py";
    let mut child = Command::new("python3")
        .args([script, "--explain", "--key-hex", key_hex])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    // Write from another thread: Python answers line by line, and a full stdout pipe would
    // otherwise block both sides.
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "pmm1.py failed");
    let lines: Vec<Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), identities.len());

    let mut tokens_seen = 0;
    for (i, (identity, py)) in identities.iter().zip(&lines).enumerate() {
        let n = Normalized::of(identity);
        let f = |v: &Option<String>| v.clone().map(Value::String).unwrap_or(Value::Null);
        let rust = json!({ "FN": f(&n.first), "LN": f(&n.last), "DOB": f(&n.dob), "SEX": f(&n.sex),
            "ZIP5": f(&n.zip5), "HOUSE": f(&n.house), "PHONE": f(&n.phone) });
        assert_eq!(
            rust,
            py["normalized"],
            "identity #{i}: {:?}",
            (&identity.given, &identity.family, &identity.line1, &identity.postal_code, &identity.phone, &identity.birth_date)
        );
        for t in TokenType::ALL {
            let m = message(t, &n);
            assert_eq!(m.as_deref(), py["messages"][t.name()].as_str(), "identity #{i} {}", t.name());
            if let Some(m) = m {
                assert_eq!(Some(hex::encode(key.token(&m)).as_str()), py["tokens"][t.name()].as_str());
                tokens_seen += 1;
            }
        }
    }
    assert!(tokens_seen > 500, "the generator exercises tokens too ({tokens_seen})");
}
