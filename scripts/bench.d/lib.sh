# Shared by the benchmark scripts (sourced).

# Drops a benchmark's database. FORCE ends the sessions left behind, but not an autovacuum
# worker for a role that is not a superuser ("must be a member of the role whose process is
# being terminated"), and autovacuum starts on a benchmark's tables as soon as their load ends
# (or, in bench api, as soon as its last phase hands the audit trail back). A plain DROP ends
# autovacuum workers itself, so it is the second try.
drop_database() {
  local try force
  for try in 1 2 3 4 5; do
    for force in " WITH (FORCE)" ""; do
      PGPASSWORD=fhir psql -X -q -h 127.0.0.1 -U fhir -d postgres -c "DROP DATABASE IF EXISTS $1$force" 2>/dev/null && return
    done
    sleep 2
  done
  echo "could not drop database $1; drop it by hand" >&2
}
