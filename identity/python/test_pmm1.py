"""The reference tokenizer reproduces every pinned vector (standard library unittest)."""

import json
import os
import unittest

import pmm1

VECTORS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "identity", "vectors.json")


class Vectors(unittest.TestCase):
    def test_every_vector_reproduces_exactly(self):
        with open(VECTORS) as f:
            v = json.load(f)
        key, pepper = bytes.fromhex(v["test_key_hex"]), bytes.fromhex(v["test_pepper_hex"])
        self.assertTrue(v["vectors"])
        for case in v["vectors"]:
            n = pmm1.normalize(case["input"])
            self.assertEqual(n, case["normalized"])
            msgs = pmm1.messages(n)
            for t, expected in case["tokens"].items():
                self.assertEqual(msgs[t], expected["message"])
                tok = pmm1.token(key, msgs[t])
                self.assertEqual(tok, expected["token"])
                self.assertEqual(pmm1.stored(pepper, tok), expected["stored"])

    def test_rules(self):
        self.assertEqual(pmm1.first_name("Dr. John Q."), "JOHN")
        self.assertIsNone(pmm1.first_name("Baby Girl"))
        self.assertEqual(pmm1.first_name("Dr"), "DR")
        self.assertEqual(pmm1.first_name("Mr Mr"), "MR")
        self.assertEqual(pmm1.last_name("Jr"), "JR")
        self.assertEqual(pmm1.house_key("PO Box 0012"), "POB12")
        self.assertIsNone(pmm1.zip5("12345"))
        self.assertIsNone(pmm1.phone("617-055-0123"))
        self.assertEqual(pmm1.soundex("ASHCRAFT"), "A261")
        self.assertIsNone(pmm1.zip5("０２１３９"), "only ASCII digits count")


if __name__ == "__main__":
    unittest.main()
