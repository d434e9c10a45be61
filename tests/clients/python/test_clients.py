"""Clients not written here, against the running API (started by tests/tests/clients.rs).

FHIR_ORIGIN (http://host:port), FHIR_MEMBER (a member with a medication profile, attributed
to the partner), FHIR_TOKEN (that partner's bearer token, from the SMART Backend Services flow)
and GENERATED_PYTHON_CLIENT (where openapi-python-client wrote the client) come from the harness.
"""

import os
import sys

ORIGIN = os.environ["FHIR_ORIGIN"]
MEMBER = os.environ["FHIR_MEMBER"]
TOKEN = os.environ["FHIR_TOKEN"]


def test_generated_python_client_reads_a_medication_profile():
    sys.path.insert(0, os.environ["GENERATED_PYTHON_CLIENT"])
    from fhir_platform_client import AuthenticatedClient, Client
    from fhir_platform_client.api.patient import medication_profile
    from fhir_platform_client.models import Bundle, OperationOutcome

    anonymous = medication_profile.sync_detailed(client=Client(base_url=ORIGIN), id=MEMBER)
    assert anonymous.status_code == 401
    assert isinstance(anonymous.parsed, OperationOutcome)

    client = AuthenticatedClient(base_url=ORIGIN, token=TOKEN)
    response = medication_profile.sync_detailed(client=client, id=MEMBER)
    assert response.status_code == 200
    bundle = response.parsed
    assert isinstance(bundle, Bundle)
    assert bundle.resource_type == "Bundle"
    assert bundle.type_ == "collection"
    patient = bundle.entry[0].resource
    assert patient.resource_type == "Patient" and patient.id == MEMBER
    assert response.headers["etag"] == f'W/"{bundle.additional_properties["meta"]["versionId"]}"'

    missing = medication_profile.sync_detailed(client=client, id="NO-SUCH-MEMBER")
    assert missing.status_code == 404
    assert isinstance(missing.parsed, OperationOutcome)


def test_fhirclient_reads_a_patient_and_searches_medication_statements():
    from fhirclient import client
    from fhirclient.models.medicationstatement import MedicationStatement
    from fhirclient.models.patient import Patient

    smart = client.FHIRClient(settings={"app_id": "platform-tests", "api_base": f"{ORIGIN}/fhir/"})
    smart.server.session.headers["Authorization"] = f"Bearer {TOKEN}"
    patient = Patient.read(MEMBER, smart.server)
    assert patient.id == MEMBER

    statements = list(MedicationStatement.where(struct={"patient": MEMBER, "_count": "2"}).perform_resources_iter(smart.server))
    assert statements, "the member has medication statements"
    for s in statements:
        assert s.subject.reference == f"Patient/{MEMBER}"
        coding = s.medicationCodeableConcept.coding[0]
        assert coding.system == "http://www.nlm.nih.gov/research/umls/rxnorm"


def test_authlib_parses_every_token_endpoint_refusal():
    """An OAuth 2.0 client library (authlib, private_key_jwt) reads each refusal of the token
    endpoint as the RFC 6749 §5.2 error it is. FHIR_CLIENT_ID, FHIR_CLIENT_KID and
    FHIR_CLIENT_KEY (a PEM file) name the partner and its RS384 key."""
    import time

    import requests
    from authlib.integrations.requests_client import OAuth2Session, OAuthError
    from authlib.oauth2.rfc7523 import PrivateKeyJWT
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    token_url = requests.get(f"{ORIGIN}/.well-known/smart-configuration", timeout=10).json()["token_endpoint"]
    client_id, kid = os.environ["FHIR_CLIENT_ID"], os.environ["FHIR_CLIENT_KID"]
    with open(os.environ["FHIR_CLIENT_KEY"]) as f:
        key = f.read()
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()

    def fetch(client=client_id, signing_key=key, scope="system/*.read", **claims):
        # The server takes assertions of at most 5 minutes (authlib's default is an hour).
        claims.setdefault("exp", int(time.time()) + 240)
        auth = PrivateKeyJWT(token_url, claims=claims, headers={"kid": kid}, alg="RS384")
        session = OAuth2Session(client, signing_key, token_endpoint_auth_method=auth, scope=scope)
        return session.fetch_token(token_url, grant_type="client_credentials")

    def refused(expected, **kwargs):
        try:
            fetch(**kwargs)
        except OAuthError as e:
            assert e.error == expected, (kwargs, e.error, e.description)
            assert e.description, kwargs
            return
        raise AssertionError(f"a token was issued for {kwargs}")

    assert fetch()["access_token"]
    refused("invalid_client", client="nobody-registered")
    refused("invalid_client", signing_key=stranger)
    refused("invalid_client", exp=int(time.time()) - 120)
    assert fetch(jti="authlib-once")["token_type"].lower() == "bearer"
    refused("invalid_client", jti="authlib-once")
    refused("invalid_scope", scope="system/AuditEvent.read")
