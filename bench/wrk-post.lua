-- wrk script used by bench/load.py: POSTs the JSON body in the file named by the first script
-- argument, with the Authorization header given as the optional second one and any further
-- arguments sent as headers (`wrk ... -s wrk-post.lua URL -- BODY_FILE ["Bearer KEY" ["Name: value" ...]]`),
-- and prints one machine-readable line.
init = function(args)
    local f = assert(io.open(args[1], "rb"))
    wrk.body = f:read("*a")
    f:close()
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
    if args[2] and args[2] ~= "" then
        wrk.headers["Authorization"] = args[2]
    end
    for i = 3, #args do
        local name, value = args[i]:match("^([^:]+):%s*(.*)$")
        if name then
            wrk.headers[name] = value
        end
    end
end

done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
        '"write":%d,"status":%d,"timeout":%d,"p50_us":%.0f,"p99_us":%.0f}\n',
        summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
        e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
