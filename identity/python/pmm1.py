#!/usr/bin/env python3
"""PMM1 reference tokenizer for partners (Python standard library only).

Implements ../shared/identity/PMM1.md byte for byte, as the platform's Rust implementation does:
normalize the seven points of identity, build the token messages, key them with your partner
key (HMAC-SHA256). Only the tokens leave your systems; never the identity.

    python3 pmm1.py --key-file partner.key < patients.jsonl > tokens.jsonl

Each input line is a JSON object with any of: given, family, birthDate (YYYY-MM-DD), gender
(FHIR: male|female|…), line1, postalCode, phone. Each output line holds the tokens that could be
made, e.g. {"T1": "81c8…", "T2": "276c…"}. --explain adds the normalized fields and messages
(for testing only: they are identity).
"""

import argparse
import datetime
import hashlib
import hmac
import json
import re
import sys
import unicodedata

# Unicode White_Space (what Rust's char::is_whitespace means), spelled out so both sides agree.
_WHITESPACE = re.compile("[\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_FOLDS = {"ß": "SS", "ẞ": "SS", "Æ": "AE", "æ": "AE", "Ø": "O", "ø": "O", "Ł": "L", "ł": "L",
          "Đ": "D", "đ": "D", "Þ": "TH", "þ": "TH", "Œ": "OE", "œ": "OE", "ı": "I"}
TITLES = {"MR", "MRS", "MS", "MISS", "MX", "DR", "DOCTOR", "PROF", "REV", "FR", "SIR", "HON"}
SUFFIXES = {"JR", "JNR", "JUNIOR", "SR", "SNR", "SENIOR", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX",
            "2ND", "3RD", "4TH"}
PLACEHOLDERS = {"UNKNOWN", "UNK", "NONE", "NA", "NULL", "TEST", "PATIENT", "ANONYMOUS", "BABY", "BABYBOY",
                "BABYGIRL", "INFANT", "NEWBORN", "MISSING"}
ASCII_DIGITS = "0123456789"


def _split(text):
    return [t for t in _WHITESPACE.split(text) if t]


def fold(text):
    out = []
    for c in unicodedata.normalize("NFKD", text):
        if unicodedata.category(c).startswith("M"):
            continue
        out.append(_FOLDS.get(c) or c.upper())
    return " ".join(_split("".join(out)))


def _is_one_of(token, words):
    return (token[:-1] if token.endswith(".") else token) in words


def _name(raw, given):
    tokens = _split(fold(raw.replace(",", " ")))
    # A title leads a name: a lone "Dr" is the name (keeps normalization idempotent).
    if given and len(tokens) > 1 and _is_one_of(tokens[0], TITLES):
        tokens.pop(0)
    if len(tokens) > 1 and _is_one_of(tokens[-1], SUFFIXES):
        tokens.pop()
    if given and len(tokens) > 1:
        bare = tokens[-1][:-1] if tokens[-1].endswith(".") else tokens[-1]
        if len(bare) == 1 and "A" <= bare <= "Z":
            tokens.pop()
    letters = "".join(c for c in "".join(tokens) if "A" <= c <= "Z")
    return letters if letters and letters not in PLACEHOLDERS else None


def first_name(raw):
    return _name(raw, True)


def last_name(raw):
    return _name(raw, False)


def birth_date(raw, today=None):
    today = today or datetime.datetime.now(datetime.timezone.utc).date()
    shaped = len(raw) == 10 and all((c == "-") if i in (4, 7) else (c in ASCII_DIGITS) for i, c in enumerate(raw))
    if not shaped:
        return None
    try:
        d = datetime.date(int(raw[0:4]), int(raw[5:7]), int(raw[8:10]))
    except ValueError:
        return None
    return raw if datetime.date(1900, 1, 1) <= d <= today else None


def sex(raw):
    return {"male": "M", "female": "F"}.get(raw)


def zip5(raw):
    digits = "".join(c for c in raw if c in ASCII_DIGITS)
    if len(digits) not in (5, 9):
        return None
    z = digits[:5]
    return None if z == z[0] * 5 or z == "12345" else z


def _no_leading_zeros(digits):
    return digits.lstrip("0") or None


def house_key(raw):
    spaced = fold(raw).replace(".", " ").replace(",", " ")
    tokens = _split(spaced)
    number = None
    for prefix in (["P", "O", "BOX"], ["PO", "BOX"], ["POST", "OFFICE", "BOX"], ["BOX"]):
        if len(tokens) > len(prefix) and tokens[:len(prefix)] == prefix:
            number = tokens[len(prefix)]
            break
    if number is not None:
        if not number or any(c not in ASCII_DIGITS for c in number):
            return None
        n = _no_leading_zeros(number)
        return "POB" + n if n else None
    leading = ""
    for c in spaced:
        if c not in ASCII_DIGITS:
            break
        leading += c
    return _no_leading_zeros(leading)


def phone(raw):
    digits = "".join(c for c in raw if c in ASCII_DIGITS)
    if len(digits) == 11 and digits.startswith("1"):
        digits = digits[1:]
    if len(digits) != 10 or digits[0] in "01" or digits[3] in "01" or digits == digits[0] * 10:
        return None
    return digits


_SOUNDEX = {**dict.fromkeys("BFPV", "1"), **dict.fromkeys("CGJKQSXZ", "2"), **dict.fromkeys("DT", "3"),
            "L": "4", **dict.fromkeys("MN", "5"), "R": "6", "H": "h", "W": "h"}


def soundex(name):
    if not name or not "A" <= name[0] <= "Z":
        return None
    out, last = name[0], _SOUNDEX.get(name[0], "0")
    for c in name[1:]:
        k = _SOUNDEX.get(c, "0")
        if k == "h":
            continue
        if k == "0":
            last = "0"
        elif k != last:
            out += k
            last = k
            if len(out) == 4:
                break
    return out.ljust(4, "0")


def normalize(identity):
    g = lambda k: identity.get(k) or ""
    return {"FN": first_name(g("given")), "LN": last_name(g("family")), "DOB": birth_date(g("birthDate")),
            "SEX": sex(g("gender")), "ZIP5": zip5(g("postalCode")), "HOUSE": house_key(g("line1")),
            "PHONE": phone(g("phone"))}


def messages(n):
    fn = n["FN"]
    sx = lambda v: soundex(v) if v else None
    fields = {
        "T1": [n["LN"], fn, n["DOB"], n["SEX"], n["ZIP5"]],
        "T2": [n["LN"], fn[:1] if fn else None, n["DOB"], n["SEX"]],
        "T3": [sx(n["LN"]), sx(fn), n["DOB"], n["SEX"]],
        "T4": [fn, n["DOB"], n["SEX"], n["HOUSE"], n["ZIP5"]],
        "T5": [n["LN"], fn, n["DOB"], n["PHONE"]],
    }
    return {t: "|".join(["PMM1", t] + f) for t, f in fields.items() if all(f)}


def token(key, message):
    return hmac.new(key, message.encode("ascii"), hashlib.sha256).hexdigest()


def stored(pepper, token_hex):
    """What the platform stores (for tests: partners never hold the pepper)."""
    return hmac.new(pepper, bytes.fromhex(token_hex), hashlib.sha256).hexdigest()


def tokens(key, identity):
    return {t: token(key, m) for t, m in messages(normalize(identity)).items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--key-file", help="file holding the partner key as 64 hex characters")
    source.add_argument("--key-hex", help="the partner key as 64 hex characters (prefer --key-file)")
    parser.add_argument("--explain", action="store_true", help="also print normalized fields and messages (identity!)")
    args = parser.parse_args(argv)
    key_hex = open(args.key_file).read().strip() if args.key_file else args.key_hex
    key = bytes.fromhex(key_hex)
    if len(key) != 32:
        parser.error("the partner key is 32 bytes (64 hex characters)")
    for line in sys.stdin:
        if not line.strip():
            continue
        identity = json.loads(line)
        n = normalize(identity)
        msgs = messages(n)
        out = {t: token(key, m) for t, m in msgs.items()}
        if args.explain:
            out = {"normalized": n, "messages": msgs, "tokens": out}
        print(json.dumps(out, ensure_ascii=True), flush=True)


if __name__ == "__main__":
    main()
