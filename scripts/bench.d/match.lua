-- wrk: POST $hashed-match with request bodies from REQUESTS_FILE (one Parameters per line:
-- tokens of indexed members and of random people), as the partner whose token is in TOKEN.
local bodies = {}
for line in io.lines(os.getenv("REQUESTS_FILE")) do bodies[#bodies + 1] = line end
local headers = { ["Content-Type"] = "application/fhir+json", ["Authorization"] = "Bearer " .. os.getenv("TOKEN") }
math.randomseed(os.time())

request = function()
  return wrk.format("POST", "/fhir/Patient/$hashed-match", headers, bodies[math.random(#bodies)])
end

response = function(status)
  if status ~= 200 and status ~= 422 then error("status " .. status) end
end
