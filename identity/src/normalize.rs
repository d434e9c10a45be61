//! PMM1 normalization of the seven points of identity. Every function returns `None` for a
//! value that is missing or counts as missing; what it returns is already in the form that
//! goes into a token message.

use time::{Date, Month, OffsetDateTime};
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// Unicode NFKD, combining marks dropped, the letters NFKD keeps folded (ß→SS, Æ→AE, Ø→O,
/// Ł→L, Đ→D, Þ→TH, Œ→OE, ı→I), uppercase, whitespace collapsed to single spaces.
pub fn fold(text: &str) -> String {
    let mut upper = String::with_capacity(text.len());
    for c in text.nfkd().filter(|c| !is_combining_mark(*c)) {
        match c {
            'ß' | 'ẞ' => upper.push_str("SS"),
            'Æ' | 'æ' => upper.push_str("AE"),
            'Ø' | 'ø' => upper.push('O'),
            'Ł' | 'ł' => upper.push('L'),
            'Đ' | 'đ' => upper.push('D'),
            'Þ' | 'þ' => upper.push_str("TH"),
            'Œ' | 'œ' => upper.push_str("OE"),
            'ı' => upper.push('I'),
            c => upper.extend(c.to_uppercase()),
        }
    }
    upper.split_whitespace().collect::<Vec<_>>().join(" ")
}

const TITLES: [&str; 12] = ["MR", "MRS", "MS", "MISS", "MX", "DR", "DOCTOR", "PROF", "REV", "FR", "SIR", "HON"];
const SUFFIXES: [&str; 17] = ["JR", "JNR", "JUNIOR", "SR", "SNR", "SENIOR", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "2ND", "3RD", "4TH"];
const PLACEHOLDERS: [&str; 14] =
    ["UNKNOWN", "UNK", "NONE", "NA", "NULL", "TEST", "PATIENT", "ANONYMOUS", "BABY", "BABYBOY", "BABYGIRL", "INFANT", "NEWBORN", "MISSING"];

fn is_one_of(token: &str, words: &[&str]) -> bool {
    let bare = token.strip_suffix('.').unwrap_or(token);
    words.contains(&bare)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum NameKind {
    Given,
    Family,
}

fn name(raw: &str, kind: NameKind) -> Option<String> {
    let folded = fold(&raw.replace(',', " "));
    let mut tokens: Vec<&str> = folded.split(' ').filter(|t| !t.is_empty()).collect();
    // A title leads a name: a lone "Dr" is the name. (Read this way, like the suffix rule's
    // "unless nothing would remain", normalizing a normalized name changes nothing.)
    if kind == NameKind::Given && tokens.len() > 1 && is_one_of(tokens[0], &TITLES) {
        tokens.remove(0);
    }
    if tokens.len() > 1 && tokens.last().is_some_and(|t| is_one_of(t, &SUFFIXES)) {
        tokens.pop();
    }
    if kind == NameKind::Given && tokens.len() > 1 {
        let last = tokens[tokens.len() - 1];
        let bare = last.strip_suffix('.').unwrap_or(last);
        if bare.chars().count() == 1 && bare.chars().all(|c| c.is_ascii_uppercase()) {
            tokens.pop();
        }
    }
    let letters: String = tokens.concat().chars().filter(|c| c.is_ascii_uppercase()).collect();
    (!letters.is_empty() && !PLACEHOLDERS.contains(&letters.as_str())).then_some(letters)
}

/// First name: title, suffix and middle initial dropped, then only A–Z.
pub fn first_name(raw: &str) -> Option<String> {
    name(raw, NameKind::Given)
}

/// Last name: suffix dropped, then only A–Z.
pub fn last_name(raw: &str) -> Option<String> {
    name(raw, NameKind::Family)
}

/// `YYYY-MM-DD`, a real date from 1900-01-01 to `today`.
pub fn birth_date(raw: &str, today: Date) -> Option<String> {
    let b = raw.as_bytes();
    let shaped = b.len() == 10 && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() });
    if !shaped {
        return None;
    }
    let year: i32 = raw[0..4].parse().ok()?;
    let month = Month::try_from(raw[5..7].parse::<u8>().ok()?).ok()?;
    let date = Date::from_calendar_date(year, month, raw[8..10].parse().ok()?).ok()?;
    let earliest = Date::from_calendar_date(1900, Month::January, 1).ok()?;
    (date >= earliest && date <= today).then(|| raw.to_owned())
}

/// [`birth_date`] against today's UTC date.
pub fn birth_date_today(raw: &str) -> Option<String> {
    birth_date(raw, OffsetDateTime::now_utc().date())
}

/// FHIR gender `male` → `M`, `female` → `F`; anything else is missing.
pub fn sex(raw: &str) -> Option<String> {
    match raw {
        "male" => Some("M".into()),
        "female" => Some("F".into()),
        _ => None,
    }
}

/// Digits only; 5 or 9 of them; the first 5; placeholders (00000, 11111 … 99999, 12345) missing.
pub fn zip5(raw: &str) -> Option<String> {
    let digits: String = raw.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() != 5 && digits.len() != 9 {
        return None;
    }
    let zip = &digits[..5];
    let repeated = zip.bytes().all(|b| b == zip.as_bytes()[0]);
    (!repeated && zip != "12345").then(|| zip.to_owned())
}

fn without_leading_zeros(digits: &str) -> Option<String> {
    let trimmed = digits.trim_start_matches('0');
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

/// From address line 1: `POB<n>` for a post-office box, else the leading house number,
/// without leading zeros.
pub fn house_key(raw: &str) -> Option<String> {
    let spaced = fold(raw).replace(['.', ','], " ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let box_number = match tokens.as_slice() {
        ["P", "O", "BOX", n, ..] | ["PO", "BOX", n, ..] | ["POST", "OFFICE", "BOX", n, ..] | ["BOX", n, ..] => Some(*n),
        _ => None,
    };
    if let Some(n) = box_number {
        return n.bytes().all(|b| b.is_ascii_digit()).then(|| without_leading_zeros(n)).flatten().map(|n| format!("POB{n}"));
    }
    let leading: String = spaced.chars().take_while(char::is_ascii_digit).collect();
    without_leading_zeros(&leading)
}

/// Digits only; a leading 1 of 11 digits dropped; 10 digits whose first and fourth are not 0
/// or 1, and not all the same digit.
pub fn phone(raw: &str) -> Option<String> {
    let mut digits: String = raw.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() == 11 && digits.starts_with('1') {
        digits.remove(0);
    }
    let b = digits.as_bytes();
    let ok = b.len() == 10 && !matches!(b[0], b'0' | b'1') && !matches!(b[3], b'0' | b'1') && !b.iter().all(|d| *d == b[0]);
    ok.then_some(digits)
}

/// American Soundex of an A–Z name, 4 characters (H and W do not separate equal codes;
/// vowels do).
pub fn soundex(name: &str) -> Option<String> {
    let code = |c: u8| match c {
        b'B' | b'F' | b'P' | b'V' => b'1',
        b'C' | b'G' | b'J' | b'K' | b'Q' | b'S' | b'X' | b'Z' => b'2',
        b'D' | b'T' => b'3',
        b'L' => b'4',
        b'M' | b'N' => b'5',
        b'R' => b'6',
        b'H' | b'W' => b'h',
        _ => b'0', // vowels (and Y)
    };
    let bytes = name.as_bytes();
    let first = *bytes.first().filter(|b| b.is_ascii_uppercase())?;
    let mut out = vec![first];
    let mut last = code(first);
    for &c in &bytes[1..] {
        let k = code(c);
        match k {
            b'h' => continue,
            b'0' => last = b'0',
            _ if k == last => {}
            _ => {
                out.push(k);
                last = k;
                if out.len() == 4 {
                    break;
                }
            }
        }
    }
    out.resize(4, b'0');
    String::from_utf8(out).ok()
}
