package platform;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.rest.api.MethodOutcome;
import ca.uhn.fhir.rest.client.api.IGenericClient;
import ca.uhn.fhir.rest.client.api.ServerValidationModeEnum;
import ca.uhn.fhir.rest.client.interceptor.BearerTokenAuthInterceptor;
import ca.uhn.fhir.rest.server.exceptions.PreconditionFailedException;
import ca.uhn.fhir.rest.server.exceptions.ResourceNotFoundException;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import ca.uhn.fhir.validation.SingleValidationMessage;
import com.nimbusds.jose.JOSEObjectType;
import com.nimbusds.jose.JWSAlgorithm;
import com.nimbusds.jose.JWSHeader;
import com.nimbusds.jose.crypto.RSASSASigner;
import com.nimbusds.jose.util.JSONObjectUtils;
import com.nimbusds.jwt.JWTClaimsSet;
import com.nimbusds.jwt.SignedJWT;
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyFactory;
import java.security.interfaces.RSAPrivateKey;
import java.security.spec.PKCS8EncodedKeySpec;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Date;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.stream.Collectors;
import org.hl7.fhir.common.hapi.validation.support.CommonCodeSystemsTerminologyService;
import org.hl7.fhir.common.hapi.validation.support.InMemoryTerminologyServerValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;
import ca.uhn.fhir.context.support.DefaultProfileValidationSupport;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.hl7.fhir.r4b.model.Bundle;
import org.hl7.fhir.r4b.model.CapabilityStatement;
import org.hl7.fhir.r4b.model.CodeableConcept;
import org.hl7.fhir.r4b.model.Coding;
import org.hl7.fhir.r4b.model.DateTimeType;
import org.hl7.fhir.r4b.model.IdType;
import org.hl7.fhir.r4b.model.MedicationStatement;
import org.hl7.fhir.r4b.model.Parameters;
import org.hl7.fhir.r4b.model.Patient;
import org.hl7.fhir.r4b.model.Reference;
import org.hl7.fhir.r4b.model.Subscription;

/**
 * A partner's Java client against the running API, as a partner would write it: the SMART
 * Backend Services flow with nimbus-jose-jwt, HAPI FHIR's generic client (R4B) for every
 * interaction a partner uses, and HAPI's validator (R4B core; R4 core, with the differences
 * that are only the FHIR version's) over every resource the server returned. Exits non-zero on
 * the first failure; prints one line per step.
 *
 * <p>Environment (from tests/tests/e2e/clients.rs): FHIR_ORIGIN (http://host:port), FHIR_MEMBER
 * (a member attributed to the partner, with medications), FHIR_CLIENT_ID, FHIR_CLIENT_KID and
 * FHIR_CLIENT_KEY (a PKCS#8 PEM file with the partner's RSA key).
 */
public final class PartnerClient {
  private static final String RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm";
  private static final String IDS = "urn:example:java-partner:statements";
  private static final String BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
  private static final String TOPIC = "https://fhir-event-platform.example/SubscriptionTopic/medication-profile";

  /**
   * R4 core reports these about R4B resources only because the version differs; each is
   * matched by its message and justified here.
   */
  private static final Map<String, String> R4_VERSION_ONLY = Map.of(
      // R4's FHIRVersion value set ends at 4.0.1; the server declares R4B.
      "4.3.0", "CapabilityStatement.fhirVersion is 4.3.0 (R4B), a code R4's FHIRVersion value set does not have",
      // SubscriptionTopic is a resource of R4B (and R5); R4 servers describe the topic in a Basic
      // resource, which an R4B server has no reason to do.
      "SubscriptionTopic", "SubscriptionTopic is a resource type of R4B, not of R4's ResourceType value set");

  private final List<IBaseResource> received = new ArrayList<>();

  public static void main(String[] args) throws Exception {
    new PartnerClient().run();
  }

  private static String env(String name) {
    String value = System.getenv(name);
    if (value == null || value.isEmpty()) {
      throw new IllegalStateException(name + " is not set");
    }
    return value;
  }

  private static void check(boolean condition, String what) {
    if (!condition) {
      throw new AssertionError(what);
    }
  }

  private static void step(String what) {
    System.out.println("java partner: " + what);
  }

  private <T extends IBaseResource> T keep(T resource) {
    received.add(resource);
    return resource;
  }

  private void run() throws Exception {
    String origin = env("FHIR_ORIGIN");
    String base = origin + "/fhir";
    String member = env("FHIR_MEMBER");
    String token = token(origin, "system/*.read system/MedicationStatement.write system/Subscription.write");
    step("token through SMART Backend Services (RS384 client assertion, nimbus-jose-jwt)");

    FhirContext r4b = FhirContext.forR4B();
    // The client reads the CapabilityStatement once and checks the FHIR version (the default).
    r4b.getRestfulClientFactory().setServerValidationMode(ServerValidationModeEnum.ONCE);
    IGenericClient client = r4b.newRestfulGenericClient(base);
    client.registerInterceptor(new BearerTokenAuthInterceptor(token));

    keep(client.capabilities().ofType(CapabilityStatement.class).execute());
    step("capabilities");

    Patient patient = keep(client.read().resource(Patient.class).withId(member).execute());
    check(patient.getIdElement().getIdPart().equals(member), "read Patient/" + member);
    step("read Patient");
    try {
      client.read().resource(Patient.class).withId("NO-SUCH-MEMBER").execute();
      throw new AssertionError("a member that does not exist was read");
    } catch (ResourceNotFoundException expected) {
      step("404 as ResourceNotFoundException");
    }

    // Search, two to a page, following next links to the end.
    Bundle page = keep(client.search().forResource(MedicationStatement.class)
        .where(MedicationStatement.PATIENT.hasId(member)).count(2).returnBundle(Bundle.class).execute());
    List<MedicationStatement> statements = new ArrayList<>();
    int pages = 0;
    while (true) {
      pages++;
      page.getEntry().forEach(e -> statements.add((MedicationStatement) e.getResource()));
      if (page.getLink(Bundle.LINK_NEXT) == null) {
        break;
      }
      page = keep(client.loadPage().next(page).execute());
    }
    check(!statements.isEmpty(), "the member has medication statements");
    check(page.getTotal() == statements.size(), "total " + page.getTotal() + " = " + statements.size() + " paged");
    step("search: " + statements.size() + " statements in " + pages + " pages");

    MedicationStatement first = statements.get(0);
    String firstId = first.getIdElement().getIdPart();
    String version = first.getMeta().getVersionId();
    MedicationStatement vread = keep(client.read().resource(MedicationStatement.class).withIdAndVersion(firstId, version).execute());
    check(vread.getMeta().getVersionId().equals(version), "vread version " + version);
    step("vread MedicationStatement/" + firstId + "/_history/" + version);
    Bundle history = keep(client.history().onInstance(new IdType("MedicationStatement", firstId)).returnBundle(Bundle.class).execute());
    check(!history.getEntry().isEmpty(), "history has entries");
    step("history: " + history.getEntry().size() + " versions");

    Bundle profile = keep(client.operation().onInstance(new IdType("Patient", member)).named("$medication-profile")
        .withNoParameters(Parameters.class).useHttpGet().returnResourceType(Bundle.class).execute());
    check(profile.getType() == Bundle.BundleType.COLLECTION, "$medication-profile is a collection Bundle");
    check(profile.getEntry().get(0).getResource() instanceof Patient, "$medication-profile starts with the Patient");
    step("$medication-profile: " + profile.getEntry().size() + " entries");

    // Write-back: a plain create, then a conditional create twice (one resource).
    MethodOutcome created = client.create().resource(statement(member, "plain-" + UUID.randomUUID())).execute();
    check(Boolean.TRUE.equals(created.getCreated()), "plain create is 201");
    check(created.getResource() != null, "the created resource is returned");
    keep(created.getResource());
    String identifier = "conditional-" + UUID.randomUUID();
    int before = statementsOf(client, member);
    MethodOutcome once = client.create().resource(statement(member, identifier)).conditional()
        .where(MedicationStatement.IDENTIFIER.exactly().systemAndIdentifier(IDS, identifier)).execute();
    MethodOutcome twice = client.create().resource(statement(member, identifier)).conditional()
        .where(MedicationStatement.IDENTIFIER.exactly().systemAndIdentifier(IDS, identifier)).execute();
    check(Boolean.TRUE.equals(once.getCreated()), "the first conditional create creates");
    check(!Boolean.TRUE.equals(twice.getCreated()), "the second conditional create creates nothing");
    String onceId = once.getId().getIdPart();
    check(onceId.equals(twice.getId().getIdPart()), "both conditional creates name one resource: " + onceId + ", " + twice.getId());
    int after = statementsOf(client, member);
    check(after == before + 1, "two conditional creates made one resource: " + before + " -> " + after);
    step("create, and conditional create twice: one resource " + onceId);

    // Update with If-Match, then again with the version that is no longer current: 412.
    MedicationStatement current = keep(client.read().resource(MedicationStatement.class).withId(onceId).execute());
    String v1 = current.getMeta().getVersionId();
    current.setStatus(MedicationStatement.MedicationStatusCodes.COMPLETED);
    MethodOutcome updated = client.update().resource(current).withId(onceId).withAdditionalHeader("If-Match", "W/\"" + v1 + "\"").execute();
    String v2 = updated.getId().getVersionIdPart();
    check(v2 != null && !v2.equals(v1), "update made a new version: " + v1 + " -> " + v2);
    try {
      current.setStatus(MedicationStatement.MedicationStatusCodes.STOPPED);
      client.update().resource(current).withId(onceId).withAdditionalHeader("If-Match", "W/\"" + v1 + "\"").execute();
      throw new AssertionError("an update on a stale version was accepted");
    } catch (PreconditionFailedException expected) {
      step("update with If-Match (version " + v2 + "), 412 on the stale version " + v1);
    }

    // A Subscription on the Kafka channel, and its $status.
    Subscription subscription = r4b.newJsonParser().parseResource(Subscription.class, subscriptionJson());
    MethodOutcome subscribed = client.create().resource(subscription).execute();
    String subscriptionId = subscribed.getId().getIdPart();
    keep(client.read().resource(Subscription.class).withId(subscriptionId).execute());
    Bundle status = keep(client.operation().onInstance(new IdType("Subscription", subscriptionId)).named("$status")
        .withNoParameters(Parameters.class).useHttpGet().returnResourceType(Bundle.class).execute());
    check(status.getEntry().size() >= 1, "$status has the SubscriptionStatus entry");
    step("Subscription/" + subscriptionId + " $status");

    validate(r4b);
  }

  /** How many MedicationStatements the member has (the search's exact total). */
  private static int statementsOf(IGenericClient client, String member) {
    return client.search().forResource(MedicationStatement.class).where(MedicationStatement.PATIENT.hasId(member)).count(1)
        .returnBundle(Bundle.class).execute().getTotal();
  }

  private static MedicationStatement statement(String member, String identifier) {
    MedicationStatement s = new MedicationStatement();
    s.addIdentifier().setSystem(IDS).setValue(identifier);
    s.setStatus(MedicationStatement.MedicationStatusCodes.ACTIVE);
    s.setMedication(new CodeableConcept().addCoding(new Coding(RXNORM, "860975", null)));
    s.setSubject(new Reference("Patient/" + member));
    s.setDateAssertedElement(new DateTimeType("2026-11-20"));
    s.addNote().setText("reported by a Java partner");
    return s;
  }

  private static String subscriptionJson() {
    return "{\"resourceType\":\"Subscription\",\"status\":\"requested\",\"reason\":\"keep the medication list current\","
        + "\"criteria\":\"" + TOPIC + "\",\"channel\":{\"type\":\"message\",\"_type\":{\"extension\":[{\"url\":\"" + BACKPORT
        + "backport-channel-type\",\"valueCoding\":{\"system\":\"urn:fhir-event-platform:subscription-channel-type\",\"code\":\"kafka\"}}]},"
        + "\"payload\":\"application/fhir+json\",\"_payload\":{\"extension\":[{\"url\":\"" + BACKPORT
        + "backport-payload-content\",\"valueCode\":\"id-only\"}]}}}";
  }

  /** Every resource received, under R4B core (0 errors), then R4 core (only version-only errors). */
  private void validate(FhirContext r4b) {
    int errors = 0;
    for (IBaseResource resource : received) {
      for (SingleValidationMessage m : validator(r4b).validateWithResult(resource).getMessages()) {
        if (m.getSeverity().ordinal() >= ResultSeverityEnum.ERROR.ordinal()) {
          errors++;
          System.out.println("  R4B error: " + resource.fhirType() + " " + m.getLocationString() + ": " + m.getMessage());
        }
      }
    }
    step("validated " + received.size() + " resources with HAPI's FhirInstanceValidator (R4B core): " + errors + " errors");
    check(errors == 0, errors + " R4B validation errors");

    FhirContext r4 = FhirContext.forR4();
    FhirValidator r4Validator = validator(r4);
    int r4Errors = 0;
    int versionOnly = 0;
    for (IBaseResource resource : received) {
      String json = r4b.newJsonParser().encodeResourceToString(resource);
      IBaseResource asR4;
      try {
        asR4 = r4.newJsonParser().parseResource(json);
      } catch (ca.uhn.fhir.parser.DataFormatException e) {
        // A $status Bundle holds a SubscriptionStatus, a resource R4B added (the R4 Backport
        // carries the same content in Parameters): R4 cannot read it at all.
        check(e.getMessage().contains("Unknown resource name \"SubscriptionStatus\""), "R4 cannot parse " + resource.fhirType() + ": " + e.getMessage());
        versionOnly++;
        System.out.println("  R4 version-only: " + resource.fhirType() + " holds a SubscriptionStatus, a resource type R4 does not have");
        continue;
      }
      for (SingleValidationMessage m : r4Validator.validateWithResult(asR4).getMessages()) {
        if (m.getSeverity().ordinal() < ResultSeverityEnum.ERROR.ordinal()) {
          continue;
        }
        String why = R4_VERSION_ONLY.entrySet().stream().filter(e -> m.getMessage().contains(e.getKey())).map(Map.Entry::getValue)
            .findFirst().orElse(null);
        if (why == null) {
          r4Errors++;
          System.out.println("  R4 error: " + resource.fhirType() + " " + m.getLocationString() + ": " + m.getMessage());
        } else {
          versionOnly++;
          System.out.println("  R4 version-only: " + m.getLocationString() + ": " + why);
        }
      }
    }
    step("validated " + received.size() + " resources under R4 core: " + r4Errors + " errors, " + versionOnly + " version-only");
    check(r4Errors == 0, r4Errors + " R4 validation errors that are not the version's");
  }

  private static FhirValidator validator(FhirContext ctx) {
    ValidationSupportChain chain = new ValidationSupportChain(
        new DefaultProfileValidationSupport(ctx),
        new CommonCodeSystemsTerminologyService(ctx),
        new InMemoryTerminologyServerValidationSupport(ctx),
        new SnapshotGeneratingValidationSupport(ctx));
    FhirValidator validator = ctx.newValidator();
    validator.registerValidatorModule(new FhirInstanceValidator(chain));
    return validator;
  }

  /** The SMART Backend Services flow: discovery, a signed client assertion, the token request. */
  private static String token(String origin, String scope) throws Exception {
    HttpClient http = HttpClient.newHttpClient();
    String discovery = http.send(HttpRequest.newBuilder(URI.create(origin + "/fhir/.well-known/smart-configuration")).build(),
        HttpResponse.BodyHandlers.ofString()).body();
    String tokenUrl = field(discovery, "token_endpoint");
    String clientId = env("FHIR_CLIENT_ID");
    JWTClaimsSet claims = new JWTClaimsSet.Builder().issuer(clientId).subject(clientId).audience(tokenUrl)
        .expirationTime(new Date(System.currentTimeMillis() + 240_000)).jwtID(UUID.randomUUID().toString()).build();
    SignedJWT assertion = new SignedJWT(
        new JWSHeader.Builder(JWSAlgorithm.RS384).keyID(env("FHIR_CLIENT_KID")).type(JOSEObjectType.JWT).build(), claims);
    assertion.sign(new RSASSASigner(privateKey(Path.of(env("FHIR_CLIENT_KEY")))));
    Map<String, String> form = Map.of(
        "grant_type", "client_credentials",
        "scope", scope,
        "client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion", assertion.serialize());
    String body = form.entrySet().stream()
        .map(e -> e.getKey() + "=" + URLEncoder.encode(e.getValue(), StandardCharsets.UTF_8)).collect(Collectors.joining("&"));
    HttpResponse<String> response = http.send(HttpRequest.newBuilder(URI.create(tokenUrl))
        .header("Content-Type", "application/x-www-form-urlencoded").POST(HttpRequest.BodyPublishers.ofString(body)).build(),
        HttpResponse.BodyHandlers.ofString());
    check(response.statusCode() == 200, "token request answered " + response.statusCode());
    return field(response.body(), "access_token");
  }

  /** A string field of a JSON object (the discovery document, the token response). */
  private static String field(String json, String name) throws java.text.ParseException {
    Object value = JSONObjectUtils.parse(json).get(name);
    check(value instanceof String, "no " + name + " in " + json);
    return (String) value;
  }

  private static RSAPrivateKey privateKey(Path pem) throws Exception {
    String base64 = Files.readString(pem).replaceAll("-----[A-Z ]+-----", "").replaceAll("\\s", "");
    return (RSAPrivateKey) KeyFactory.getInstance("RSA").generatePrivate(new PKCS8EncodedKeySpec(Base64.getDecoder().decode(base64)));
  }
}
