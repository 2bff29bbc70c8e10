-- wrk script for `make bench`: send the body in $BODY_FILE (POST by default; $METHOD,
-- $CONTENT_TYPE and $HEADERS, "Name: value|Name: value", change the request), and print
-- one machine-readable line at the end (requests, non-2xx, socket errors, p50/p99 µs).
wrk.method = os.getenv("METHOD") or "POST"
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE") or "application/json"
for pair in string.gmatch(os.getenv("HEADERS") or "", "[^|]+") do
  local name, value = string.match(pair, "^%s*([^:]+):%s*(.-)%s*$")
  wrk.headers[name] = value
end
local path = os.getenv("BODY_FILE")
if path and path ~= "" then
  local file = assert(io.open(path, "rb"))
  wrk.body = file:read("*a")
  file:close()
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, e.status,
    e.connect + e.read + e.write + e.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99)))
end
