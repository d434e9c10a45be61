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
