-- Token buckets shared by every API instance: a partner's rate limits (its read limit and its
-- `$hashed-match` limit) hold in total, however many instances serve it. Instances take tokens
-- in small leases (`rate_limits::take`), so most requests never reach this table.
--
-- Unlogged: a bucket costs no WAL, and one lost in a crash comes back full, as a new one would.
CREATE UNLOGGED TABLE rate_buckets (
    key text COLLATE "C" PRIMARY KEY,
    tokens double precision NOT NULL,
    at timestamptz NOT NULL
);

-- Takes up to `want` whole tokens from `key`'s bucket (refilled at `rate` per second up to
-- `burst`), creating it full. Returns how many were granted and the tokens left after.
-- The clock is read once the row is locked, so a caller that waited cannot refill the bucket
-- for a time another caller already accounted for.
CREATE FUNCTION take_rate_tokens(p_key text, p_rate double precision, p_burst double precision, p_want integer,
                                 OUT granted integer, OUT tokens_left double precision)
LANGUAGE plpgsql AS $$
DECLARE
    stored double precision;
    stored_at timestamptz;
    now_ timestamptz;
    available double precision;
BEGIN
    INSERT INTO rate_buckets (key, tokens, at) VALUES (p_key, p_burst, clock_timestamp()) ON CONFLICT (key) DO NOTHING;
    SELECT b.tokens, b.at INTO stored, stored_at FROM rate_buckets b WHERE b.key = p_key FOR UPDATE;
    now_ := greatest(clock_timestamp(), stored_at);
    available := least(p_burst, stored + extract(epoch FROM now_ - stored_at)::double precision * p_rate);
    granted := greatest(0, least(p_want, floor(available)::integer));
    tokens_left := available - granted;
    UPDATE rate_buckets SET tokens = tokens_left, at = now_ WHERE key = p_key;
END
$$;
