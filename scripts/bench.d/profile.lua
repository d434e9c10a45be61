-- wrk: GET $medication-profile for random members from members.txt (one id per line), as the
-- partner whose bearer token is in TOKEN (every member in the file is attributed to it).
-- With RATE_DELAY_MS set, each connection waits that long between requests (an open-loop
-- approximation of a fixed request rate: connections x 1000 / delay req/s).
--
-- The load generator shares the machine's two cores with the API and PostgreSQL, so it does as
-- little as it can per request: each request is formatted once, at start, and there is no
-- `response` callback (with one, wrk hands every response's headers and body to Lua: 42 µs of
-- CPU per request here, against 25 µs without). wrk still counts every status above 399
-- ("Non-2xx or 3xx responses"), and api.sh fails the run on it.
local members = {}
for line in io.lines(os.getenv("MEMBERS_FILE")) do members[#members + 1] = line end
local delay_ms = tonumber(os.getenv("RATE_DELAY_MS") or "0")
local authorization = "Bearer " .. os.getenv("TOKEN")
math.randomseed(os.time())

local requests = {}
init = function()
  local headers = { ["Accept"] = "application/fhir+json", ["Authorization"] = authorization }
  for i, id in ipairs(members) do
    requests[i] = wrk.format("GET", "/fhir/Patient/" .. id .. "/$medication-profile", headers)
  end
end

request = function()
  return requests[math.random(#requests)]
end

-- With RATE_POISSON=1 the waits are exponential with that mean instead, so the connections'
-- requests arrive independently (a Poisson stream, as from many unrelated clients) rather than
-- in the lock-step bursts that equal waits fall into after any pause.
if delay_ms > 0 and os.getenv("RATE_POISSON") == "1" then
  delay = function() return math.max(0, math.floor(-delay_ms * math.log(1 - math.random()) + 0.5)) end
elseif delay_ms > 0 then
  delay = function() return delay_ms end
end
