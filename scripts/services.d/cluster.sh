# The cluster profile of scripts/services (sourced by it): three Apache Kafka brokers in KRaft
# mode (combined broker+controller) on loopback, from the same Maven-fetched jars, secured:
#   clients:      SASL_SSL, SCRAM-SHA-512, on 127.0.0.1:19092-19094
#   brokers:      SSL with client certificates (principal CN=broker), 127.0.0.1:19192-19194
#   controllers:  SSL with client certificates, 127.0.0.1:19292-19294
# StandardAuthorizer with allow.everyone.if.no.acl.found=false; replication factor 3 and
# min.insync.replicas 2 by default. Under $state/kafka-cluster: a CA and the brokers'
# certificate (openssl), one password per principal (secrets/, mode 600), a librdkafka
# properties file per principal (clients/<name>.properties, without the password, which the
# component reads from KAFKA_CLIENT_SASL_PASSWORD_FILE), and each node's data and log.
# docs/operations.md#the-cluster-profile says how to run the platform on it.

cluster_home=$state/kafka-cluster
cluster_heap=${KAFKA_CLUSTER_HEAP:-512m}
cluster_nodes=(1 2 3)
cluster_bootstrap=127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094

# The platform's principals. SoR producers get one each, named after the topic they may write.
cluster_platform_users=(admin composer relay notifier api)
cluster_sor_users=(sor-demographics sor-medications sor-allergies sor-immunizations sor-care-tasks sor-attribution)
declare -A cluster_sor_topic=(
  [sor-demographics]=sor.member.demographics.v1 [sor-medications]=sor.pharmacy.medications.v1
  [sor-allergies]=sor.emr.allergies.v1 [sor-immunizations]=sor.immunization.registry.v1
  [sor-care-tasks]=sor.care.tasks.v1 [sor-attribution]=sor.member.attribution.v1)

cluster_pid() { echo "$cluster_home/node$1/broker.pid"; }
cluster_node_running() { local f; f=$(cluster_pid "$1"); [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }

# A CA and one certificate for every broker (SAN 127.0.0.1 and localhost), PEM, the key PKCS#8.
cluster_tls() {
  local tls=$cluster_home/tls
  [ -f "$tls/broker-keystore.pem" ] && return 0
  command -v openssl >/dev/null || apt_install openssl
  say "cluster: generating a CA and the brokers' certificate in $tls"
  mkdir -p "$tls"
  chmod 700 "$tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=fhir-platform-cluster-ca" \
    -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=broker" -keyout "$tls/broker.key" -out "$tls/broker.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' >"$tls/broker.ext"
  openssl x509 -req -in "$tls/broker.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial -days 3650 \
    -extfile "$tls/broker.ext" -out "$tls/broker.pem" 2>/dev/null
  openssl pkcs8 -topk8 -nocrypt -in "$tls/broker.key" -out "$tls/broker.pk8"
  cat "$tls/broker.pk8" "$tls/broker.pem" >"$tls/broker-keystore.pem"
  chmod 600 "$tls"/*.key "$tls"/*.pk8 "$tls/broker-keystore.pem"
}

# A password per principal (kept), and its librdkafka properties file.
cluster_secret() {
  local name=$1 dir=$cluster_home/secrets
  mkdir -p "$dir" "$cluster_home/clients"
  chmod 700 "$dir"
  if [ ! -s "$dir/$name.password" ]; then
    (umask 077 && openssl rand -hex 24 >"$dir/$name.password")
  fi
  cat >"$cluster_home/clients/$name.properties" <<EOF
# librdkafka properties of the principal $name (the password: KAFKA_CLIENT_SASL_PASSWORD_FILE=$dir/$name.password)
security.protocol=SASL_SSL
sasl.mechanisms=SCRAM-SHA-512
sasl.username=$name
ssl.ca.location=$cluster_home/tls/ca.pem
EOF
}

cluster_password() { cat "$cluster_home/secrets/$1.password"; }

# The admin principal's configuration for Kafka's Java tools.
cluster_admin_config() {
  local f=$cluster_home/clients/admin.java.properties
  (umask 077 && cat >"$f" <<EOF
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(cluster_password admin)";
ssl.truststore.type=PEM
ssl.truststore.location=$cluster_home/tls/ca.pem
EOF
  )
  echo "$f"
}

cluster_properties() {
  local n=$1 tls=$cluster_home/tls
  cat <<EOF
# Node $n of the secured three-node cluster (scripts/services up --cluster writes this file).
process.roles=broker,controller
node.id=$n
controller.quorum.voters=1@127.0.0.1:19291,2@127.0.0.1:19292,3@127.0.0.1:19293
listeners=CLIENT://127.0.0.1:1909$((n + 1)),INTERNAL://127.0.0.1:1919$((n + 1)),CONTROLLER://127.0.0.1:1929$n
advertised.listeners=CLIENT://127.0.0.1:1909$((n + 1)),INTERNAL://127.0.0.1:1919$((n + 1))
listener.security.protocol.map=CLIENT:SASL_SSL,INTERNAL:SSL,CONTROLLER:SSL
controller.listener.names=CONTROLLER
inter.broker.listener.name=INTERNAL
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.client.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location=$tls/broker-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$tls/ca.pem
listener.name.internal.ssl.client.auth=required
listener.name.controller.ssl.client.auth=required
ssl.principal.mapping.rules=RULE:^CN=([^,]*).*\$/\$1/,DEFAULT
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:broker;User:admin
log.dirs=$cluster_home/node$n/data
num.partitions=3
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
# Kafka's 50 spread coordinators over many brokers; on three, each one's replica fetches walked
# all 50 partitions on every fetch (the offsets topic's 6 above, likewise).
transaction.state.log.num.partitions=6
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
auto.create.topics.enable=false
delete.topic.enable=true
group.initial.rebalance.delay.ms=0
# A broker that stops heartbeating is fenced (and its partitions led by others) after 3 s, not
# Kafka's 9 s: the fault test's SIGKILLed leader stalled its partitions for the whole session.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=3000
log.segment.bytes=134217728
num.network.threads=2
num.io.threads=2
EOF
}

cluster_java_args() {
  printf '%s\n' -server -Xms"$cluster_heap" -Xmx"$cluster_heap" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$here/services/kafka/log4j2.xml" -cp "$kafka_libs/*"
}

cluster_java() { local args; mapfile -t args < <(cluster_java_args); java "${args[@]}" "$@"; }

# Kafka's tools, quiet but for warnings.
cluster_tool() {
  java -Xmx256m -Dlog4j2.configurationFile="$here/services/kafka/log4j2-tools.xml" -cp "$kafka_libs/*" "$@"
}

# One of Kafka's admin tools (a main class and its arguments) against the cluster, as admin.
cluster_admin() {
  local class=$1
  shift
  cluster_tool "$class" --bootstrap-server "$cluster_bootstrap" --command-config "$(cluster_admin_config)" "$@" >/dev/null
}

cluster_up() {
  kafka_fetch
  cluster_tls
  for u in "${cluster_platform_users[@]}" "${cluster_sor_users[@]}"; do cluster_secret "$u"; done
  local n cluster_id="" scram=()
  for u in "${cluster_platform_users[@]}" "${cluster_sor_users[@]}"; do
    scram+=(--add-scram "SCRAM-SHA-512=[name=$u,password=$(cluster_password "$u")]")
  done
  for n in "${cluster_nodes[@]}"; do
    mkdir -p "$cluster_home/node$n/data"
    cluster_properties "$n" >"$cluster_home/node$n/server.properties"
    if [ ! -f "$cluster_home/node$n/data/meta.properties" ]; then
      [ -n "$cluster_id" ] || cluster_id=$(cat "$cluster_home/cluster.id" 2>/dev/null || cluster_java kafka.tools.StorageTool random-uuid)
      echo "$cluster_id" >"$cluster_home/cluster.id"
      say "cluster: formatting node $n (principals bootstrapped with SCRAM credentials)"
      cluster_java kafka.tools.StorageTool format -t "$cluster_id" -c "$cluster_home/node$n/server.properties" \
        "${scram[@]}" >>"$cluster_home/node$n/broker.log" 2>&1
    fi
  done
  for n in "${cluster_nodes[@]}"; do
    if cluster_node_running "$n"; then say "cluster: node $n already running (pid $(cat "$(cluster_pid "$n")"))"; continue; fi
    port_open "1909$((n + 1))" && die "something else listens on 127.0.0.1:1909$((n + 1))"
    local log=$cluster_home/node$n/broker.log args
    [ -f "$log" ] && mv -f "$log" "$log.1"
    mapfile -t args < <(cluster_java_args)
    setsid java "${args[@]}" kafka.Kafka "$cluster_home/node$n/server.properties" >>"$log" 2>&1 </dev/null &
    echo $! >"$(cluster_pid "$n")"
  done
  for n in "${cluster_nodes[@]}"; do
    local ok=""
    for _ in $(seq 1 360); do
      cluster_node_running "$n" || die "cluster: node $n exited while starting; see $cluster_home/node$n/broker.log"
      if port_open "1909$((n + 1))" && grep -q "Kafka Server started" "$cluster_home/node$n/broker.log"; then ok=1; break; fi
      sleep 0.5
    done
    [ -n "$ok" ] || die "cluster: node $n did not start within 180 s; see $cluster_home/node$n/broker.log"
  done
  # ACLs live in the cluster's metadata: granted again only when this file changed.
  local grants
  grants=$(sha256sum "$here/scripts/services.d/cluster.sh" | cut -d' ' -f1)
  if [ "$(cat "$cluster_home/acls.granted" 2>/dev/null)" != "$grants" ]; then
    cluster_acls
    echo "$grants" >"$cluster_home/acls.granted"
  fi
  say "cluster ready: $cluster_bootstrap (SASL_SSL, SCRAM-SHA-512; principals' properties in $cluster_home/clients, passwords in $cluster_home/secrets)"
}

# The ACLs of the platform's principals: only what each uses. Adding an ACL that exists is a
# no-op, so this runs at every `up`.
cluster_acls() {
  acl() { cluster_admin org.apache.kafka.tools.AclCommand --add --force "$@"; }
  say "cluster: granting the platform's principals their ACLs"
  # composer: reads sor.*, writes dead letters, creates the platform's topics at start.
  acl --allow-principal User:composer --operation Read --operation Describe --topic sor. --resource-pattern-type prefixed
  acl --allow-principal User:composer --operation Write --operation Describe --topic sor.dlq.v1
  acl --allow-principal User:composer --operation Read --group fhir-composer --resource-pattern-type prefixed
  acl --allow-principal User:composer --allow-principal User:relay --operation Create --operation Describe \
    --topic sor. --topic fhir. --topic partner.inbound.v1 --topic relay.transactions.v1 --resource-pattern-type prefixed
  # relay: writes fhir.* and partner.inbound.v1 in transactions, and reads back its own topic.
  acl --allow-principal User:relay --operation Write --operation Describe --topic fhir. --resource-pattern-type prefixed
  acl --allow-principal User:relay --operation Write --operation Read --operation Describe --topic partner.inbound.v1 --topic relay.transactions.v1
  acl --allow-principal User:relay --operation Write --operation Describe --transactional-id fhir-relay
  acl --allow-principal User:relay --operation Read --group fhir-relay --resource-pattern-type prefixed
  # notifier: the Kafka channel of Subscriptions; it reads a subscription's last notification
  # back when it takes over from a notifier that stopped mid-delivery.
  acl --allow-principal User:notifier --operation Write --operation Read --operation Describe --operation Create \
    --topic fhir.partner. --resource-pattern-type prefixed
  acl --allow-principal User:notifier --operation Read --group fhir-notifier --resource-pattern-type prefixed
  # api: the audit trail's topic.
  acl --allow-principal User:api --operation Write --operation Describe --operation Create --topic audit.events.v1
  local u
  for u in "${cluster_sor_users[@]}"; do
    acl --allow-principal "User:$u" --operation Write --operation Describe --topic "${cluster_sor_topic[$u]}"
  done
}

# A partner's principal: reads its own topics (fhir.partner.<id>.*) with groups prefixed with
# its id, nothing else. `grant` creates its SCRAM credential (its password kept in secrets/) and
# ACLs and prints its librdkafka properties file; `revoke` removes both (a disabled partner).
cluster_partner() {
  local action=$1 id=$2
  [[ $id =~ ^[A-Za-z0-9._-]+$ ]] || die "a partner id is letters, digits, '.', '_' and '-'"
  local principal=partner-$id
  local acls=(--allow-principal "User:$principal" --operation Read --operation Describe --topic "fhir.partner.$id." --resource-pattern-type prefixed)
  local group=(--allow-principal "User:$principal" --operation Read --group "$id" --resource-pattern-type prefixed)
  case "$action" in
    grant)
      cluster_secret "$principal"
      cluster_admin org.apache.kafka.tools.ConfigCommand --alter \
        --add-config "SCRAM-SHA-512=[password=$(cluster_password "$principal")]" --entity-type users --entity-name "$principal"
      cluster_admin org.apache.kafka.tools.AclCommand --add --force "${acls[@]}"
      cluster_admin org.apache.kafka.tools.AclCommand --add --force "${group[@]}"
      echo "$cluster_home/clients/$principal.properties" ;;
    revoke)
      cluster_admin org.apache.kafka.tools.AclCommand --remove --force "${acls[@]}"
      cluster_admin org.apache.kafka.tools.AclCommand --remove --force "${group[@]}"
      # A credential that was never made is already gone.
      cluster_admin org.apache.kafka.tools.ConfigCommand --alter \
        --delete-config SCRAM-SHA-512 --entity-type users --entity-name "$principal" 2>/dev/null || true ;;
    *) die "partner-principal grant|revoke ID" ;;
  esac
}

cluster_down() {
  local n pid
  for n in "${cluster_nodes[@]}"; do
    cluster_node_running "$n" || { rm -f "$(cluster_pid "$n")"; continue; }
    pid=$(cat "$(cluster_pid "$n")")
    say "cluster: stopping node $n (pid $pid)"
    kill -TERM "$pid"
  done
  for n in "${cluster_nodes[@]}"; do
    [ -f "$(cluster_pid "$n")" ] || continue
    pid=$(cat "$(cluster_pid "$n")")
    for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$(cluster_pid "$n")"
  done
  say "cluster stopped"
}

cluster_status() {
  local n rc=0
  for n in "${cluster_nodes[@]}"; do
    if cluster_node_running "$n" && port_open "1909$((n + 1))"; then say "cluster node $n: running on 127.0.0.1:1909$((n + 1))"
    else say "cluster node $n: not running"; rc=1; fi
  done
  return $rc
}
