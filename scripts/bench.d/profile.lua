-- wrk: GET $medication-profile for random members from members.txt (one id per line), as the
-- partner whose bearer token is in TOKEN (every member in the file is attributed to it).
-- With RATE_DELAY_MS set, each connection waits that long between requests (an open-loop
-- approximation of a fixed request rate: connections x 1000 / delay req/s).
local members = {}
for line in io.lines(os.getenv("MEMBERS_FILE")) do members[#members + 1] = line end
local delay_ms = tonumber(os.getenv("RATE_DELAY_MS") or "0")
local authorization = "Bearer " .. os.getenv("TOKEN")
math.randomseed(os.time())

request = function()
  local id = members[math.random(#members)]
  return wrk.format("GET", "/fhir/Patient/" .. id .. "/$medication-profile", { ["Accept"] = "application/fhir+json", ["Authorization"] = authorization })
end

-- With RATE_POISSON=1 the waits are exponential with that mean instead, so the connections'
-- requests arrive independently (a Poisson stream, as from many unrelated clients) rather than
-- in the lock-step bursts that equal waits fall into after any pause.
if delay_ms > 0 and os.getenv("RATE_POISSON") == "1" then
  delay = function() return math.max(0, math.floor(-delay_ms * math.log(1 - math.random()) + 0.5)) end
elseif delay_ms > 0 then
  delay = function() return delay_ms end
end

response = function(status)
  if status ~= 200 then error("status " .. status) end
end
