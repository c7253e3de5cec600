-- wrk script for `make bench` (bench/run.py): POSTs to Smally and reports JSON from done().
--
--   wrk -t2 -c16 -d8s -s bench/smally.lua http://127.0.0.1:PORT/v1/embed -- MODE INPUTS SEED
--
-- MODE    embed       {"text": T}, T a fresh text of 6-10 random common words per request
--         embeddings  {"model": ..., "input": T} (INPUTS = 1) or [T1, ..., Tn] (INPUTS = n)
--         cached      {"text": T}, T one of CACHED_TEXTS fixed texts (warm them first)
--         cached-embeddings  {"model": ..., "input": [T1, ..., Tn]}: the same n fixed texts in
--                     every request (all cache hits once warm)
-- SEED    mixed with the thread number, so every run and thread draws its own texts (a run
--         that reused another's texts would be served from the cache).
-- The API key comes from SMALLY_BENCH_KEY and the word list from SMALLY_BENCH_WORDS (one word a
-- line), both set by bench/run.py; the key stays out of the process list.

local CACHED_TEXTS = 20
local MODEL = "all-MiniLM-L6-v2"

local threads = {}

function setup(thread)
  thread:set("thread_number", #threads + 1)
  table.insert(threads, thread)
end

local words, mode, inputs, cached = {}, "embed", 1, {}

local function sentence()
  local parts = {}
  for i = 1, math.random(6, 10) do
    parts[i] = words[math.random(#words)]
  end
  return table.concat(parts, " ")
end

function init(args)
  mode = args[1] or "embed"
  inputs = tonumber(args[2] or "1")
  local seed = tonumber(args[3] or "1")
  for line in io.lines(os.getenv("SMALLY_BENCH_WORDS")) do
    if #line > 0 then
      table.insert(words, line)
    end
  end
  -- The same fixed set in every thread and run: seeded alike before the per-thread seed.
  math.randomseed(20240101)
  for i = 1, math.max(CACHED_TEXTS, inputs) do
    cached[i] = sentence()
  end
  math.randomseed(seed * 1000 + thread_number)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("SMALLY_BENCH_KEY")
end

function request()
  local body
  if mode == "embeddings" then
    local input
    if inputs == 1 then
      input = '"' .. sentence() .. '"'
    else
      local texts = {}
      for i = 1, inputs do
        texts[i] = '"' .. sentence() .. '"'
      end
      input = "[" .. table.concat(texts, ",") .. "]"
    end
    body = '{"model":"' .. MODEL .. '","input":' .. input .. "}"
  elseif mode == "cached-embeddings" then
    local texts = {}
    for i = 1, inputs do
      texts[i] = '"' .. cached[i] .. '"'
    end
    body = '{"model":"' .. MODEL .. '","input":[' .. table.concat(texts, ",") .. "]}"
  elseif mode == "cached" then
    body = '{"text":"' .. cached[math.random(#cached)] .. '"}'
  else
    body = '{"text":"' .. sentence() .. '"}'
  end
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\n{"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p95":%d,"p99":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency.max
  ))
end
