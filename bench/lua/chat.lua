-- wrk script: chat completions spread over many subscribers' API keys.
--
--   wrk -s bench/lua/chat.lua http://127.0.0.1:9103 -- <keys> [stream]
--
-- Every request picks one of <keys> imported keys at random,
-- sk-bench-00000001-xxxxxxxxxxxx ... (bench/bench.py creates them).
-- With "stream" the body asks for a stream and the X-Bench-Stream header
-- makes the mock provider answer with SSE.  The requests are assembled
-- from fixed pieces, so that the client spends little per request.

local keys = 1000
local head, tail

function setup(thread)
    thread:set("seed", math.random(1, 2147483647))
end

function init(args)
    local stream = false
    local body, extra

    keys = tonumber(args[1] or "1000")
    stream = args[2] == "stream"

    math.randomseed(seed or os.time())

    if stream then
        body = '{"model":"bench","stream":true,"messages":[{"role":"user",'
               .. '"content":"Stream a greeting to the benchmark."}]}'
        extra = "X-Bench-Stream: 1\r\n"
    else
        body = '{"model":"bench","messages":[{"role":"user",'
               .. '"content":"Say hello to the benchmark."}]}'
        extra = ""
    end

    head = "POST /v1/chat/completions HTTP/1.1\r\n"
           .. "Host: 127.0.0.1\r\n"
           .. "Content-Type: application/json\r\n"
           .. "Content-Length: " .. #body .. "\r\n"
           .. extra
           .. "Authorization: Bearer sk-bench-"
    tail = "-xxxxxxxxxxxx\r\n\r\n" .. body
end

function request()
    return head .. string.format("%08d", math.random(keys)) .. tail
end

-- one line of JSON for bench/bench.py; latencies in microseconds
function done(summary, latency, requests)
    local e = summary.errors

    io.write(string.format(
        'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,'
        .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,'
        .. '"timeout":%d},"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,'
        .. '"p99":%d,"max":%d}}\n',
        summary.requests, summary.duration, summary.bytes,
        e.connect, e.read, e.write, e.status, e.timeout,
        latency.mean, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency.max))
end
