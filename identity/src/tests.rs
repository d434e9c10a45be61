use super::*;
use proptest::prelude::*;
use serde_json::Value;

fn vectors() -> Value {
    // The pinned vectors of ../shared/identity, read from the file (not copied). Tests run in
    // the package's directory; a path fixed at compile time could name another clone.
    let path = "../../shared/identity/vectors.json";
    serde_json::from_str(&std::fs::read_to_string(path).expect("shared/identity/vectors.json beside the repository")).expect("vectors.json is JSON")
}

fn identity_of(input: &Value) -> Identity {
    let s = |k: &str| input[k].as_str().unwrap_or_default().to_owned();
    Identity {
        given: s("given"),
        family: s("family"),
        birth_date: s("birthDate"),
        gender: s("gender"),
        line1: s("line1"),
        postal_code: s("postalCode"),
        phone: s("phone"),
    }
}

#[test]
fn every_vector_reproduces_exactly() {
    let v = vectors();
    assert_eq!(v["scheme"], "PMM1");
    let key = PartnerKey::from_bytes(hex::decode(v["test_key_hex"].as_str().unwrap()).unwrap().try_into().unwrap());
    let pepper = Pepper::new(hex::decode(v["test_pepper_hex"].as_str().unwrap()).unwrap());
    let cases = v["vectors"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let n = Normalized::of(&identity_of(&case["input"]));
        let expected = &case["normalized"];
        let field = |f: &Option<String>| f.clone().map(Value::String).unwrap_or(Value::Null);
        assert_eq!(field(&n.first), expected["FN"]);
        assert_eq!(field(&n.last), expected["LN"]);
        assert_eq!(field(&n.dob), expected["DOB"]);
        assert_eq!(field(&n.sex), expected["SEX"]);
        assert_eq!(field(&n.zip5), expected["ZIP5"]);
        assert_eq!(field(&n.house), expected["HOUSE"]);
        assert_eq!(field(&n.phone), expected["PHONE"]);
        let expected_tokens = case["tokens"].as_object().unwrap();
        for t in TokenType::ALL {
            let e = &expected_tokens[t.name()];
            let m = message(t, &n).expect("every token of the vectors is present");
            assert_eq!(m, e["message"].as_str().unwrap(), "{} message", t.name());
            let token = key.token(&m);
            assert_eq!(hex::encode(token), e["token"].as_str().unwrap(), "{} token", t.name());
            assert_eq!(hex::encode(pepper.stored(&token)), e["stored"].as_str().unwrap(), "{} stored", t.name());
        }
    }
}

#[test]
fn normalization_rules() {
    use normalize::*;
    assert_eq!(first_name("Dr. John Q."), Some("JOHN".into()));
    assert_eq!(first_name("Mrs Ann-Marie"), Some("ANNMARIE".into()));
    assert_eq!(first_name("Baby Girl"), None);
    assert_eq!(first_name("Dr"), Some("DR".into()), "a title leads a name; alone it is the name");
    assert_eq!(first_name("Mr Mr"), Some("MR".into()));
    assert_eq!(first_name("MRא"), Some("MR".into()));
    assert_eq!(first_name("unknown"), None);
    assert_eq!(last_name("Smith, Jr"), Some("SMITH".into()));
    assert_eq!(last_name("Jr"), Some("JR".into()), "a suffix alone stays");
    assert_eq!(last_name("Łukasiewicz"), Some("LUKASIEWICZ".into()));
    assert_eq!(last_name("Straße"), Some("STRASSE".into()));
    assert_eq!(last_name("Þórsdóttir"), Some("THORSDOTTIR".into()));
    let today = time::Date::from_calendar_date(2026, time::Month::November, 27).unwrap();
    assert_eq!(birth_date("2026-11-27", today), Some("2026-11-27".into()));
    assert_eq!(birth_date("2026-11-28", today), None);
    assert_eq!(birth_date("1899-12-31", today), None);
    assert_eq!(birth_date("2023-02-29", today), None);
    assert_eq!(birth_date("1985-3-7", today), None);
    assert_eq!(sex("female"), Some("F".into()));
    assert_eq!(sex("unknown"), None);
    assert_eq!(zip5("02139-4307"), Some("02139".into()));
    assert_eq!(zip5("12345"), None);
    assert_eq!(zip5("55555"), None);
    assert_eq!(zip5("0213"), None);
    assert_eq!(house_key("PO Box 0012"), Some("POB12".into()));
    assert_eq!(house_key("Post Office Box 9"), Some("POB9".into()));
    assert_eq!(house_key("Box 3, Rural Route"), Some("POB3".into()));
    assert_eq!(house_key("0042B Elm St"), Some("42".into()));
    assert_eq!(house_key("Elm St"), None);
    assert_eq!(phone("1 (617) 555-0123"), Some("6175550123".into()));
    assert_eq!(phone("617-055-0123"), None, "fourth digit 0");
    assert_eq!(phone("2222222222"), None);
    assert_eq!(soundex("ROBERT").as_deref(), Some("R163"));
    assert_eq!(soundex("RUPERT").as_deref(), Some("R163"));
    assert_eq!(soundex("ASHCRAFT").as_deref(), Some("A261"), "H does not separate S and C");
    assert_eq!(soundex("TYMCZAK").as_deref(), Some("T522"));
    assert_eq!(soundex("PFISTER").as_deref(), Some("P236"));
    assert_eq!(soundex("LEE").as_deref(), Some("L000"));
}

#[test]
fn partner_keys_come_from_the_master_by_key_id() {
    let a = PartnerKey::derive(b"master secret", "partner-1:2026");
    let b = PartnerKey::derive(b"master secret", "partner-1:2026");
    let c = PartnerKey::derive(b"master secret", "partner-2:2026");
    assert_eq!(a.to_hex(), b.to_hex());
    assert_ne!(a.to_hex(), c.to_hex());
    assert_eq!(a.to_hex().len(), 64);
    assert_eq!(format!("{a:?}"), "PartnerKey(…)");
}

proptest! {
    #[test]
    fn names_are_idempotent_and_only_a_to_z(raw in "\\PC{0,30}") {
        for f in [normalize::first_name, normalize::last_name] {
            if let Some(n) = f(&raw) {
                prop_assert!(!n.is_empty() && n.bytes().all(|b| b.is_ascii_uppercase()), "{n:?}");
                prop_assert_eq!(f(&n), Some(n.clone()), "idempotent");
            }
        }
    }

    #[test]
    fn other_fields_are_idempotent_and_in_their_alphabet(raw in "\\PC{0,30}", digits in "[0-9 ()+.-]{0,16}") {
        for input in [raw.as_str(), digits.as_str()] {
            if let Some(z) = normalize::zip5(input) {
                prop_assert!(z.len() == 5 && z.bytes().all(|b| b.is_ascii_digit()));
                prop_assert_eq!(normalize::zip5(&z), Some(z.clone()));
            }
            if let Some(p) = normalize::phone(input) {
                prop_assert!(p.len() == 10 && p.bytes().all(|b| b.is_ascii_digit()));
                prop_assert_eq!(normalize::phone(&p), Some(p.clone()));
            }
            if let Some(h) = normalize::house_key(input) {
                let digits = h.strip_prefix("POB").unwrap_or(&h);
                prop_assert!(!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0'));
                prop_assert_eq!(normalize::house_key(&h.replace("POB", "PO BOX ")), Some(h.clone()));
            }
            if let Some(d) = normalize::birth_date_today(input) {
                prop_assert_eq!(normalize::birth_date_today(&d), Some(d.clone()));
            }
            let folded = normalize::fold(input);
            prop_assert_eq!(normalize::fold(&folded), folded.clone());
        }
    }

    #[test]
    fn soundex_is_four_characters(name in "[A-Z]{1,20}") {
        let s = normalize::soundex(&name).unwrap();
        prop_assert_eq!(s.len(), 4);
        prop_assert_eq!(s.as_bytes()[0], name.as_bytes()[0]);
        prop_assert!(s[1..].bytes().all(|b| (b'0'..=b'6').contains(&b)));
    }
}
