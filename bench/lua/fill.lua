-- wrk script: fills a benchmark store through the admin API.
--
--   wrk -t<T> -s bench/lua/fill.lua http://127.0.0.1:9113 \
--       -- create|purchase <first> <last> <T>
--
-- "create" imports subscriber i with MSISDN +86138<i> and the key
-- sk-bench-<i>-xxxxxxxxxxxx; "purchase" credits sub_<i> with a large
-- purchase whose reference is bench-<i>.  Both are idempotent, so an
-- interrupted fill can simply be run again.  Thread k of T takes the
-- numbers first+k, first+k+T, ...; when a thread has handed out its last
-- one it writes "FILL-DONE" to stderr and goes on with harmless GET
-- /metrics requests until bench/scale.py, having seen every thread done,
-- ends wrk.

local counter = 0

function setup(thread)
    thread:set("index", counter)
    counter = counter + 1
end

local mode, nexti, last, stride, done
local verified = false
local auth = "Authorization: Bearer bench-admin-key\r\n"

function init(args)
    mode = args[1]
    nexti = tonumber(args[2]) + (index or 0)
    last = tonumber(args[3])
    stride = tonumber(args[4])
    done = false
end

local function post(path, body)
    return "POST " .. path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\n" .. auth
           .. "Content-Type: application/json\r\nContent-Length: " .. #body
           .. "\r\n\r\n" .. body
end

function request()
    local i = nexti

    -- wrk calls request() of its first thread once before the run, to see
    -- how many requests one call gives; that request is never sent, so
    -- the number it took is handed out again

    if index == 0 and not verified then
        verified = true
        nexti = i
    else
        nexti = i + stride
    end

    if i > last then
        if not done then
            done = true
            io.stderr:write("FILL-DONE\n")
            io.stderr:flush()
        end

        return "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    end

    if mode == "create" then
        return post("/admin/subscribers", string.format(
            '{"msisdn":"+86138%08d","api_key":"sk-bench-%08d-xxxxxxxxxxxx"}',
            i, i))
    end

    return post(string.format("/admin/subscribers/sub_%d/purchases", i),
                string.format('{"points":1000000000000,"reference":'
                              .. '"bench-%08d"}', i))
end
