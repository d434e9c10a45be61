// Reads a medication profile from the running API through the client generated from
// openapi/openapi.json. FHIR_ORIGIN (http://host:port), FHIR_MEMBER and FHIR_TOKEN (a partner's
// bearer token; the member is attributed to that partner) come from the harness.
import { test } from "node:test";
import assert from "node:assert/strict";
import createClient from "openapi-fetch";
import type { paths } from "../generated/schema.js";

const origin = process.env.FHIR_ORIGIN ?? "";
const member = process.env.FHIR_MEMBER ?? "";
const token = process.env.FHIR_TOKEN ?? "";

test("reads a medication profile with the generated TypeScript client", async () => {
  assert.ok(origin && member && token, "FHIR_ORIGIN, FHIR_MEMBER and FHIR_TOKEN must be set");
  const anonymous = await createClient<paths>({ baseUrl: origin }).GET("/fhir/Patient/{id}/$medication-profile", {
    params: { path: { id: member } },
  });
  assert.equal(anonymous.response.status, 401);
  assert.equal(anonymous.error?.resourceType, "OperationOutcome");
  const client = createClient<paths>({ baseUrl: origin, headers: { Authorization: `Bearer ${token}` } });
  const { data, error, response } = await client.GET("/fhir/Patient/{id}/$medication-profile", {
    params: { path: { id: member } },
  });
  assert.equal(response.status, 200, JSON.stringify(error));
  if (!data) throw new Error("no body");
  assert.equal(data.resourceType, "Bundle");
  assert.equal(data.type, "collection");
  const first = data.entry?.[0]?.resource;
  assert.equal(first?.resourceType, "Patient");
  assert.equal(first?.id, member);
  assert.match(response.headers.get("etag") ?? "", /^W\/"\d+"$/);

  const missing = await client.GET("/fhir/Patient/{id}/$medication-profile", { params: { path: { id: "NO-SUCH-MEMBER" } } });
  assert.equal(missing.response.status, 404);
  assert.equal(missing.error?.resourceType, "OperationOutcome");
});
