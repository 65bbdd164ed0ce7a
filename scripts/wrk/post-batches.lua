-- wrk script for scripts/bench-http: POSTs batches of BATCH readings (4 metrics each) for
-- one device per request, cycling over DEVICES devices per thread, with unique seqs so every
-- reading is really stored. Optional pacing: RATE_PER_CONN requests/s per connection.
local batch = tonumber(os.getenv("BATCH") or "100")
local devices = tonumber(os.getenv("DEVICES") or "1000")
local rate_per_conn = tonumber(os.getenv("RATE_PER_CONN") or "0")

local thread_id = 0
local counter = 0
local threads = {}

function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
  table.insert(threads, thread)
end

function init(args)
  seqs = {}
  math.randomseed(tid + 1)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local d = counter % devices
  local device = "bench-" .. tid .. "-" .. d
  local seq = seqs[d] or 0
  local parts = {}
  for i = 1, batch do
    parts[i] = string.format(
      '{"device_id":"%s","seq":%d,"metrics":{"temperature":%.2f,"humidity":%.1f,"battery":%.3f,"door_open":%s}}',
      device, seq + i, 20 + (i % 50) / 10, 40 + (i % 20), 3.7 - (i % 100) / 1000, (i % 7 == 0) and "true" or "false")
  end
  seqs[d] = seq + batch
  return wrk.format(nil, "/v1/readings", nil, "[" .. table.concat(parts, ",") .. "]")
end

if rate_per_conn > 0 then
  function delay()
    -- Exponential inter-arrival gaps around the target rate (closer to open loop than fixed gaps).
    local mean = 1000 / rate_per_conn
    return -math.log(1 - math.random()) * mean
  end
end

statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local ok = summary.requests - summary.errors.status
  io.write(string.format("BENCH requests=%d non2xx=%d duration_s=%.2f req_per_s=%.1f readings_per_s=%.0f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f\n",
    summary.requests, summary.errors.status, summary.duration / 1e6,
    summary.requests / (summary.duration / 1e6),
    ok * batch / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
end
