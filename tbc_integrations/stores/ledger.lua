-- tbc-integrations: the ledger engine (tbc_integrations/_engine.py) ported to one Redis
-- function per call, so that each verb is atomic across hosts. Every rule here mirrors a
-- function of _engine.py of the same name; tests/test_differential.py runs random verb
-- sequences on this port and on the Python engine and requires the same state and events.
--
-- Keys (all under KEYS[1] = 'tbc:{<namespace>}:', one Redis Cluster slot per namespace):
--   num:<agent>  the agent's numbers, packed doubles (FIELDS)
--   con:<agent>  its contract (JSON)             agents   registration order (sorted set)
--   deps:<agent> agents that depend on it (set)  leases   open reservation ids by expiry
--   res:<id>     a reservation's record (JSON; settled and lapsed ones carry a TTL)
--   seq          issue counter                   total    the namespace's allocation
--   epoch        the namespace's epoch: a call naming another one is refused as 'lost'
--   lim:<key>    a limit row (JSON, expiring LIMIT_TTL after its period)
--   limits       limit row keys by when they are forgotten (sorted set, for listings)
--   team:<run>   a run's own team (BudgetManager(team_per=...)), one hash: 'f' forget
--                seconds, 'u' when it is forgotten, 'n:<agent>' each agent's numbers
--   teams        run keys by 'u' (sorted set), to reclaim forgotten teams' storage
-- Writes are buffered and made at the end of a call (save), after the verb decided; the
-- reply's numbers are strings (%.17g), so every digit reaches the client.
local ns, P, verb, now, p
local events, rows, dirty, recs, recdirty, calls, lims, limdirty
local team, tcache, trecs, trdirty
local result, err

local FIELDS = {'priority', 'min_reserve', 'max_tokens', 'allocated', 'consumed',
  'consumed_in', 'consumed_out', 'reserved', 'reserved_in', 'reserved_out', 'borrowed',
  'lent', 'refusals', 'complete', 'max_input', 'max_output', 'threshold', 'last_confidence',
  'max_cost', 'cost', 'cost_reserved', 'warn_at', 'warned'}
local NF = #FIELDS
local FMT = 'ddddddddddddddddddddddd'  -- NF doubles
local OPTIONAL = {max_tokens = true, max_input = true, max_output = true, threshold = true,
  last_confidence = true, max_cost = true, warn_at = true}
local MAX_TOKENS = 9007199254740991
local SETTLED_TTL = 3600   -- SETTLED_MEMORY_SECONDS of _engine.py (a test checks they agree)
local LIMIT_TTL = 35 * 86400  -- LIMIT_MEMORY_SECONDS: a limit row outlives its period by it
local NEVER = 9007199254740992  -- _limits.NEVER: the end of a limit without a window
local EXPIRED_TTL = 86400  -- EXPIRED_MEMORY_SECONDS

local function N(x)
  if x == nil then return nil end
  return string.format('%.17g', x)
end

-- ------------------------------------------------------------------ storage
local function unpack_row(name, raw)
  local have = math.floor(#raw / 8)  -- a row written before later fields were added
  local v = {struct.unpack(string.rep('d', have), raw)}
  local a = {name = name}
  for i = 1, NF do
    local f, x = FIELDS[i], v[i]
    if i > have then x = 0 / 0 end
    if OPTIONAL[f] and x ~= x then x = nil end  -- NaN marks an absent number
    if x ~= x then x = 0 end
    a[f] = x
  end
  return a
end
local function pack_row(a)
  local v = {}
  for i = 1, NF do
    local x = a[FIELDS[i]]
    if x == nil then x = 0 / 0 end
    v[i] = x
  end
  return struct.pack(FMT, unpack(v))
end
local function agent(name)
  local a = rows[name]
  if a then return a end
  local raw
  if team == '' then
    raw = redis.call('GET', P .. 'num:' .. name)
  elseif trecs[team] then
    raw = redis.call('HGET', P .. 'team:' .. team, 'n:' .. name)
  end
  if not raw then return nil end
  a = unpack_row(name, raw)
  rows[name] = a
  return a
end
local function write(a) dirty[a.name] = a end

-- teams per run (_engine.py's teams): the one worked on is `team` ('' the namespace's own)
local function enter(key)
  team = key
  if not tcache[key] then tcache[key] = {rows = {}, dirty = {}} end
  rows, dirty = tcache[key].rows, tcache[key].dirty
  if key == '' then return nil end
  if trecs[key] == nil then
    local d = redis.call('HMGET', P .. 'team:' .. key, 'f', 'u')
    if d[1] then
      trecs[key] = {key = key, forget = tonumber(d[1]), u = tonumber(d[2])}
    else
      trecs[key] = false
    end
  end
  return trecs[key] or nil
end
local function forget_team(key)
  redis.call('DEL', P .. 'team:' .. key)
  redis.call('ZREM', P .. 'teams', key)
  trecs[key], trdirty[key] = false, nil
  tcache[key] = {rows = {}, dirty = {}}
  if team == key then rows, dirty = tcache[key].rows, tcache[key].dirty end
end
-- an agent's first row in a run's team: its contract's fresh numbers (AgentRow.new)
local function new_row(name)
  local con = redis.call('GET', P .. 'con:' .. name)
  if not con then return nil end
  local a = unpack_row(name, redis.call('GET', P .. 'num:' .. name))
  local c = cjson.decode(con)
  local threshold = c.confidence_threshold
  if threshold == cjson.null then threshold = nil end
  a.threshold, a.last_confidence = threshold, nil
  a.allocated = a.max_tokens or 0
  for _, f in ipairs({'consumed', 'consumed_in', 'consumed_out', 'reserved', 'reserved_in',
      'reserved_out', 'borrowed', 'lent', 'refusals', 'complete', 'cost', 'cost_reserved',
      'warned'}) do
    a[f] = 0
  end
  return a
end
local function fresh(name)
  local a = nil
  if team ~= '' then a = new_row(name) end
  if not a then error({type = 'unknown', agent = name}) end
  rows[name] = a
  write(a)
  return a
end
local function all_rows()
  local out = {}
  for i, name in ipairs(redis.call('ZRANGE', P .. 'agents', 0, -1)) do
    out[i] = agent(name) or fresh(name)
  end
  return out
end
local function find(rid)
  local r = recs[rid]
  if r == nil then
    local raw = redis.call('GET', P .. 'res:' .. rid)
    if not raw then return nil end
    r = cjson.decode(raw)
    for _, l in ipairs(r.l) do l[2] = tonumber(l[2]) end
    r.i, r.o, r.e, r.q = tonumber(r.i), tonumber(r.o), tonumber(r.e), tonumber(r.q)
    r.c = tonumber(r.c or '0')
    r.k = r.k or {}
    r.t = r.t or ''
    recs[rid] = r
  end
  return r
end
local function put(rid, r, ttl) recs[rid] = r; r.ttl = ttl; recdirty[rid] = true end
local function save()
  for key, c in pairs(tcache) do
    for name, a in pairs(c.dirty) do
      if key == '' then
        redis.call('SET', P .. 'num:' .. name, pack_row(a))
      else
        redis.call('HSET', P .. 'team:' .. key, 'n:' .. name, pack_row(a))
      end
    end
  end
  for key in pairs(trdirty) do
    local x = trecs[key]
    redis.call('HSET', P .. 'team:' .. key, 'f', N(x.forget), 'u', N(x.u))
    redis.call('ZADD', P .. 'teams', N(x.u), key)
  end
  for rid in pairs(recdirty) do
    local r = recs[rid]
    local ls = {}
    for i, l in ipairs(r.l) do ls[i] = {l[1], N(l[2])} end
    local t = nil
    if r.t ~= '' then t = r.t end
    local raw = cjson.encode({s = r.s, a = r.a, i = N(r.i), o = N(r.o), e = N(r.e), q = N(r.q),
      c = N(r.c), l = ls, k = r.k, t = t})
    if r.ttl then
      redis.call('SET', P .. 'res:' .. rid, raw, 'EX', r.ttl)
    else
      redis.call('SET', P .. 'res:' .. rid, raw)
    end
  end
  for key in pairs(limdirty) do
    local x = lims[key]
    local b = nil
    if x.buckets then  -- a rolling window's buckets, oldest first: {leaves, tokens, cost}
      local ts = {}
      for t in pairs(x.buckets) do table.insert(ts, t) end
      table.sort(ts)
      b = {}
      for i, t in ipairs(ts) do b[i] = {N(t), N(x.buckets[t][1]), N(x.buckets[t][2])} end
    end
    local spent = {}
    for name, s in pairs(x.agents) do spent[name] = {N(s[1]), N(s[2]), N(s[3])} end
    local raw = cjson.encode({mt = N(x.max_tokens), mc = N(x.max_cost), wt = N(x.warn_tokens),
      wc = N(x.warn_cost), u = N(x.ends), c = N(x.consumed), r = N(x.reserved), co = N(x.cost),
      cr = N(x.cost_reserved), w = x.warned, b = b, a = spent})
    if x.ends >= NEVER then  -- a limit without a window: kept for good
      redis.call('SET', P .. 'lim:' .. key, raw)
    else
      redis.call('SET', P .. 'lim:' .. key, raw, 'EX', math.max(math.ceil(x.ends + LIMIT_TTL - now), 1))
    end
    if x.new or x.buckets then  -- listed until the row is forgotten (a rolling row's end
      -- moves on); the listing drops rows forgotten since
      redis.call('ZREMRANGEBYSCORE', P .. 'limits', '-inf', '(' .. N(now))
      redis.call('ZADD', P .. 'limits', N(x.ends + LIMIT_TTL), key)
    end
  end
  for _, c in ipairs(calls) do redis.call(unpack(c)) end
end

-- limit rows (LimitRow of _engine.py), by key: limit name, scope value, period
local function limit_row(key)
  local x = lims[key]
  if x then return x end
  local raw = redis.call('GET', P .. 'lim:' .. key)
  if not raw then return nil end
  local d = cjson.decode(raw)
  local function num(v) if v == nil or v == cjson.null then return nil end return tonumber(v) end
  x = {key = key, max_tokens = num(d.mt), max_cost = num(d.mc), warn_tokens = num(d.wt),
    warn_cost = num(d.wc), ends = num(d.u), consumed = num(d.c), reserved = num(d.r),
    cost = num(d.co), cost_reserved = num(d.cr), warned = d.w == true, agents = {}}
  if d.b ~= nil and d.b ~= cjson.null then
    x.buckets = {}
    for _, e in ipairs(d.b) do x.buckets[tonumber(e[1])] = {tonumber(e[2]), tonumber(e[3])} end
  end
  if type(d.a) == 'table' then
    for name, s in pairs(d.a) do x.agents[name] = {tonumber(s[1]), tonumber(s[2]), tonumber(s[3])} end
  end
  lims[key] = x
  return x
end
local function opt_num(v) if v == nil or v == cjson.null then return nil end return v end
-- a hold's row key and, for a rolling window, when its bucket's spend leaves it
-- (split_limit_key: 'user/u-42/24h@86400' -> 'user/u-42/24h', 86400)
local function split_key(key)
  local head, window, leaves = string.match(key, '^(.*)/([^/@]*)@([^/@]*)$')
  if head == nil then return key, nil end
  return head .. '/' .. window, tonumber(leaves)
end
local function crossed(x, consumed, cost)
  return (x.warn_tokens ~= nil and consumed >= x.warn_tokens) or
    (x.warn_cost ~= nil and cost >= x.warn_cost)
end
-- _roll: drop the buckets whose spend left the window by now
local function roll(x)
  if not x.buckets then return end
  local gone = {}
  for t in pairs(x.buckets) do if t <= now then table.insert(gone, t) end end
  if #gone == 0 then return end
  for _, t in ipairs(gone) do
    x.consumed = x.consumed - x.buckets[t][1]
    x.cost = x.cost - x.buckets[t][2]
    x.buckets[t] = nil
  end
  if x.warned and not crossed(x, x.consumed, x.cost) then x.warned = false end
  limdirty[x.key] = true
end
local function later(...) table.insert(calls, {...}) end

-- ------------------------------------------------------------------- events
local function pairs_out(loans)
  local o = {}
  for i, l in ipairs(loans) do o[i] = {l[1], N(l[2])} end
  return o
end
local function ev(kind, name, t)
  if not p.ev then return end  -- nobody listens: build no events
  t.kind, t.agent, t.time = kind, name, N(now)
  t.tokens, t.input_tokens, t.output_tokens = N(t.tokens or 0), N(t.input_tokens or 0), N(t.output_tokens or 0)
  t.donors = pairs_out(t.donors or {})
  t.cost_nanos = N(t.cost_nanos or 0)
  t.reason = t.reason or ''
  if team ~= '' then t.run = team end  -- the run whose own team the event is about
  table.insert(events, t)
end

-- ------------------------------------------------------------------ numbers
local function available(a)
  if a.max_tokens == nil then return MAX_TOKENS - a.consumed - a.reserved end  -- money only
  return a.allocated - a.consumed - a.reserved
end
local function spare(a)
  if a.max_tokens == nil then return 0 end
  if a.complete == 1 then return available(a) end
  return available(a) - a.min_reserve
end
local function gated(a)
  return a.threshold ~= nil and a.last_confidence ~= nil and a.last_confidence >= a.threshold
end
local function lend(needy, donor, t)
  donor.allocated = donor.allocated - t; donor.lent = donor.lent + t
  needy.allocated = needy.allocated + t; needy.borrowed = needy.borrowed + t
end
local function repay(b, donor, t)
  b.allocated = b.allocated - t; b.borrowed = b.borrowed - t
  donor.allocated = donor.allocated + t; donor.lent = donor.lent - t
end
local function need(name)
  return agent(name) or fresh(name)
end

-- the call's team (_enter): the namespace's own, or its run's, started fresh when the run
-- has none or its team was forgotten (idle past its 'u')
local function enter_call()
  local key = p.team
  if key == nil then
    if team ~= '' then enter('') end
    return nil
  end
  local rec = enter(key)
  if rec and rec.u <= now then
    forget_team(key)
    rec = nil
  end
  if not rec then
    for _, idle in ipairs(redis.call('ZRANGEBYSCORE', P .. 'teams', '-inf', N(now), 'LIMIT', 0, 16)) do
      if idle ~= key then forget_team(idle) end
    end
    enter(key)
    rec = {key = key, forget = p.forget, u = now + p.forget}
    trecs[key] = rec
  else
    rec.forget = p.forget
    if now + p.forget > rec.u then rec.u = now + p.forget end
  end
  trdirty[key] = true
  return rec
end
-- a reservation's team (_resume): false when it was forgotten meanwhile
local function resume(key, touch)
  if key == '' then
    if team ~= '' then enter('') end
    return true
  end
  local rec = enter(key)
  if not rec or rec.u <= now then return false end
  if touch and now + rec.forget > rec.u then
    rec.u = now + rec.forget
    trdirty[key] = true
  end
  return true
end
local function check_total(name, what, value)
  if value > MAX_TOKENS then
    error({type = 'tokens', agent = name, what = what, value = N(value)})
  end
end

local function unhold(r, touch)
  if resume(r.t, touch) then
    local a = need(r.a)
    a.reserved = a.reserved - r.i - r.o
    a.reserved_in = a.reserved_in - r.i
    a.reserved_out = a.reserved_out - r.o
    a.cost_reserved = a.cost_reserved - r.c
    for _, l in ipairs(r.l) do
      local d = need(l[1])
      repay(a, d, l[2])
      write(d)
    end
    write(a)
  end
  for _, full in ipairs(r.k) do
    local x = limit_row((split_key(full)))
    if x then
      x.reserved = x.reserved - r.i - r.o
      x.cost_reserved = x.cost_reserved - r.c
      limdirty[x.key] = true
    end
  end
end

local function sweep()
  local due = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', N(now))
  local lapsed = {}
  for i, rid in ipairs(due) do
    local r = find(rid)
    r.id = rid
    lapsed[i] = r
  end
  table.sort(lapsed, function(x, y)
    if x.e ~= y.e then return x.e < y.e end
    return x.q < y.q
  end)
  for _, r in ipairs(lapsed) do
    unhold(r, false)
    r.s = 'expired'
    put(r.id, r, EXPIRED_TTL)
    later('ZREM', P .. 'leases', r.id)
    ev('expire', r.a, {tokens = r.i + r.o, input_tokens = r.i, output_tokens = r.o,
      reservation_id = r.id, donors = r.l, reason = 'lease', cost_nanos = r.c})
  end
  return #lapsed
end

-- ------------------------------------------------------------- reallocation
local function protected(a)
  if a.consumed ~= 0 or a.reserved ~= 0 then return false end
  for _, name in ipairs(redis.call('SMEMBERS', P .. 'deps:' .. a.name)) do
    local dep = agent(name)
    if dep and dep.complete ~= 1 then return true end
  end
  return false
end

-- names compare by their bytes, as Python compares code points (UTF-8 keeps that order;
-- Lua's own '<' follows the server's collation locale)
local function name_before(x, y)
  for i = 1, math.min(#x, #y) do
    local a, b = string.byte(x, i), string.byte(y, i)
    if a ~= b then return a < b end
  end
  return #x < #y
end

-- the design's order: completed first, then lowest priority, then most remaining, then name
local function donor_before(x, y)
  if x.complete ~= y.complete then return x.complete == 1 end
  if x.complete ~= 1 and x.priority ~= y.priority then return x.priority < y.priority end
  local ax, ay = available(x), available(y)
  if ax ~= ay then return ax > ay end
  return name_before(x.name, y.name)
end

-- the policies the store runs (policies.py): greedy, the paper's weighted bound, and
-- expected gain (a donor gives only when the loan's worth meets its price)
local function borrow(needy, amount)
  local all = all_rows()
  local cands, maxp = {}, 1
  for _, d in ipairs(all) do
    if d.priority > maxp then maxp = d.priority end
    if d.name ~= needy.name and (d.complete == 1 or d.priority <= needy.priority) then
      table.insert(cands, d)
    end
  end
  table.sort(cands, donor_before)
  local left = amount
  if p.policy == 'weighted' then
    -- ConfidenceWeightedPolicy.bound: ceil(alpha * Pw * deficit * Imax), same operation order
    local deficit = 1.0
    if needy.threshold ~= nil then
      deficit = needy.threshold - (needy.last_confidence or 0.0)
      if deficit < 0 then deficit = 0.0 end
    end
    local top = maxp
    if needy.priority > top then top = needy.priority end
    local imax = needy.max_input or needy.max_tokens
    local bound = math.ceil(p.alpha * (needy.priority / top) * deficit * imax)
    if bound < left then left = bound end
  end
  local plan, found = {}, 0
  if left <= 0 then return plan, found end
  local worth = nil
  if p.policy == 'expected_gain' then
    -- ExpectedGainPolicy.gain / need, same operation order
    local gain
    if needy.last_confidence == nil then
      gain = needy.priority * p.first
    else
      gain = needy.priority * (1.0 - needy.last_confidence) * p.lift
    end
    worth = gain / amount
  end
  for _, d in ipairs(cands) do
    local s = spare(d)
    -- ExpectedGainPolicy.price: kappa * priority / available (0 once complete)
    if s > 0 and (d.complete == 1 or not protected(d))
        and (worth == nil or d.complete == 1 or worth >= p.kappa * d.priority / available(d)) then
      local take = math.min(s, left)
      table.insert(plan, {d, take})
      found = found + take
      left = left - take
      if left == 0 then break end
    end
  end
  return plan, found
end
local function apply(needy, plan)
  for _, x in ipairs(plan) do
    lend(needy, x[1], x[2])
    write(x[1])
  end
  write(needy)
end
local function loans_of(plan)
  local o = {}
  for i, x in ipairs(plan) do o[i] = {x[1].name, x[2]} end
  return o
end

local function settle_overdraft(a, rid)
  local short = -available(a)
  if short <= 0 then return 0 end
  local plan, found = borrow(a, short)
  apply(a, plan)
  local left = short - found
  if #plan > 0 then
    ev('transfer', a.name, {tokens = found, reservation_id = rid, donors = loans_of(plan), reason = 'overdraft'})
  end
  if left > 0 then ev('overdraft', a.name, {tokens = left, reservation_id = rid}) end
  return left
end

-- caps are never reallocated: usage past one is recorded and evented (_cap_overdrafts)
local function cap_overdrafts(a, rid, ui, uo, cost)
  if a.max_input ~= nil and ui > 0 and a.consumed_in > a.max_input then
    local over = a.consumed_in - a.max_input
    ev('overdraft', a.name, {input_tokens = over, reservation_id = rid,
      reason = 'input cap'})
  end
  if a.max_output ~= nil and uo > 0 and a.consumed_out > a.max_output then
    local over = a.consumed_out - a.max_output
    ev('overdraft', a.name, {output_tokens = over, reservation_id = rid,
      reason = 'output cap'})
  end
  if a.max_cost ~= nil and cost > 0 and a.cost > a.max_cost then
    ev('overdraft', a.name, {reservation_id = rid, reason = 'cost cap',
      cost_nanos = a.cost - a.max_cost})
  end
end

-- soft limits of an agent's own contract (past_warning, _warn_agent, _rearm)
local function past_warning(a)
  local w = a.warn_at
  if w == nil then return false end
  if a.max_tokens ~= nil and a.consumed >= math.ceil(a.allocated * w) then return true end
  return a.max_cost ~= nil and a.cost >= math.ceil(a.max_cost * w)
end
local function warn_agent(a)
  if a.warned == 1 or a.warn_at == nil or not past_warning(a) then return end
  a.warned = 1
  write(a)
  ev('warning', a.name, {tokens = a.consumed, reason = 'agent', cost_nanos = a.cost})
end
local function rearm(a)
  if a.warned == 1 and not past_warning(a) then
    a.warned = 0
    write(a)
  end
end

-- -------------------------------------------------------------------- verbs
local V = {}

local function dependency_cycle(contracts, start)
  local path, seen = {start}, {[start] = true}
  local function visit(name)
    local c = contracts[name]
    if c == nil then return false end
    for _, dep in ipairs(c.depends_on or {}) do
      if dep == start then table.insert(path, dep); return true end
      if not seen[dep] and contracts[dep] ~= nil then
        seen[dep] = true
        table.insert(path, dep)
        if visit(dep) then return true end
        table.remove(path)
      end
    end
    return false
  end
  if visit(start) then return path end
  return nil
end

function V.register()
  sweep()
  if team ~= '' then enter('') end
  local c = p.contract
  local name = c.agent_name
  local existing = redis.call('GET', P .. 'con:' .. name)
  if existing then
    result = {created = false, contract = existing}
    return
  end
  local contracts = {[name] = c}
  for _, other in ipairs(redis.call('ZRANGE', P .. 'agents', 0, -1)) do
    contracts[other] = cjson.decode(redis.call('GET', P .. 'con:' .. other))
  end
  local cycle = dependency_cycle(contracts, name)
  if cycle then error({type = 'contract', message = 'Dependency cycle: ' .. table.concat(cycle, ' -> ')}) end
  local function opt(v) if v == cjson.null then return nil end return v end
  local max_tokens = opt(c.max_tokens)
  local total = tonumber(redis.call('GET', P .. 'total') or '0') + (max_tokens or 0)
  if total > MAX_TOKENS then
    error({type = 'contract', message = "Agent '" .. name .. "': max_tokens " .. N(c.max_tokens) ..
      " would take namespace '" .. ns .. "' to " .. N(total) .. ' tokens in all, above the ' ..
      N(MAX_TOKENS) .. ' every store holds exactly'})
  end
  later('SET', P .. 'total', N(total))
  later('SET', P .. 'con:' .. name, p.contract_json)
  later('ZADD', P .. 'agents', redis.call('INCR', P .. 'seq'), name)
  for _, dep in ipairs(c.depends_on or {}) do later('SADD', P .. 'deps:' .. dep, name) end
  local a = {name = name, priority = c.priority, min_reserve = c.min_reserve,
    max_tokens = max_tokens, allocated = max_tokens or 0, consumed = 0, consumed_in = 0,
    consumed_out = 0, reserved = 0, reserved_in = 0, reserved_out = 0, borrowed = 0, lent = 0,
    refusals = 0, complete = 0, max_input = opt(c.max_input_tokens),
    max_output = opt(c.max_output_tokens), threshold = opt(c.confidence_threshold),
    max_cost = p.max_cost, cost = 0, cost_reserved = 0, warn_at = opt(c.warn_at), warned = 0}
  rows[name] = a
  write(a)
  ev('register', name, {tokens = max_tokens or 0})
  result = {created = true}
end

local function over_limit(amount, cost)
  for _, h in ipairs(p.holds or {}) do
    local key, leaves = split_key(h[1])
    local max_tokens, max_cost = opt_num(h[2]), opt_num(h[3])
    local x = limit_row(key)
    if x and leaves ~= nil then roll(x) end
    local used, spent = 0, 0
    if x then used, spent = x.consumed + x.reserved, x.cost + x.cost_reserved end
    if max_tokens ~= nil and used + amount > max_tokens then
      return {type = 'limit', key = key, requested = amount,
        available = math.max(max_tokens - used, 0), money = false, reason = 'limit ' .. key}
    end
    if max_cost ~= nil and spent + cost > max_cost then
      return {type = 'limit', key = key, requested = cost,
        available = math.max(max_cost - spent, 0), money = true, reason = 'limit ' .. key}
    end
  end
  return nil
end
local function hold_limits(amount, cost)
  local keys = {}
  for i, h in ipairs(p.holds or {}) do
    local key, leaves = split_key(h[1])
    local x = limit_row(key)
    if not x then
      x = {key = key, max_tokens = opt_num(h[2]), max_cost = opt_num(h[3]),
        warn_tokens = opt_num(h[4]), warn_cost = opt_num(h[5]), ends = h[6], consumed = 0,
        reserved = 0, cost = 0, cost_reserved = 0, warned = false, agents = {}, new = true}
      if leaves ~= nil then x.buckets = {} end
      lims[key] = x
    elseif leaves ~= nil and leaves > x.ends then
      x.ends = leaves
    end
    x.reserved = x.reserved + amount
    x.cost_reserved = x.cost_reserved + cost
    limdirty[key] = true
    keys[i] = h[1]
  end
  return keys
end
local function spend_limits(keys, agent_name, used, cost, held_tokens, held_cost)
  for _, full in ipairs(keys) do
    local key, leaves = split_key(full)
    local x = limit_row(key)
    if x then
      if held_tokens ~= nil then
        x.reserved = x.reserved - held_tokens
        x.cost_reserved = x.cost_reserved - held_cost
      end
      if leaves == nil then
        x.consumed = x.consumed + used
        x.cost = x.cost + cost
      else
        roll(x)
        if leaves > now and (used ~= 0 or cost ~= 0) then
          local b = x.buckets[leaves]
          if not b then b = {0, 0}; x.buckets[leaves] = b end
          b[1] = b[1] + used
          b[2] = b[2] + cost
          x.consumed = x.consumed + used
          x.cost = x.cost + cost
        end
      end
      local s = x.agents[agent_name]
      if s == nil then
        x.agents[agent_name] = {used, cost, 1}
      else
        s[1], s[2], s[3] = s[1] + used, s[2] + cost, s[3] + 1
      end
      limdirty[key] = true
      if not x.warned and crossed(x, x.consumed, x.cost) then
        x.warned = true
        ev('warning', agent_name, {tokens = x.consumed, reason = key, cost_nanos = x.cost})
      end
    end
  end
end

local function admit(probe)
  local a = need(p.agent)
  local inp, outp, cost = p.input, p.output, p.cost or 0
  if p.clamp and a.max_output ~= nil then
    local left = a.max_output - a.consumed_out - a.reserved_out
    if left > 0 and left < outp then outp = left end
  end
  local amount = inp + outp
  local av = available(a)
  local refusal, loans = nil, {}
  if gated(a) then
    refusal = {type = 'gate', requested = amount, available = math.max(av, 0),
      confidence = N(a.last_confidence), threshold = N(a.threshold), reason = 'confidence gate'}
  elseif a.max_input ~= nil and a.consumed_in + a.reserved_in + inp > a.max_input then
    refusal = {type = 'budget', requested = inp,
      available = math.max(a.max_input - a.consumed_in - a.reserved_in, 0), reason = 'input cap'}
  elseif a.max_output ~= nil and a.consumed_out + a.reserved_out + outp > a.max_output then
    refusal = {type = 'budget', requested = outp,
      available = math.max(a.max_output - a.consumed_out - a.reserved_out, 0), reason = 'output cap'}
  elseif a.max_cost ~= nil and a.cost + a.cost_reserved + cost > a.max_cost then
    refusal = {type = 'cost', requested = cost,
      available = math.max(a.max_cost - a.cost - a.cost_reserved, 0), reason = 'cost cap'}
  elseif p.holds and #p.holds > 0 and over_limit(amount, cost) ~= nil then
    refusal = over_limit(amount, cost)
  elseif amount > av then
    local short = amount - av
    local plan, found = borrow(a, short)
    if found < short then
      refusal = {type = 'budget', requested = amount, available = math.max(av, 0) + found, reason = 'budget'}
    elseif not probe then
      apply(a, plan)
      loans = loans_of(plan)
    end
  end
  if refusal then
    a.refusals = a.refusals + 1
    write(a)
    ev('refuse', p.agent, {tokens = amount, input_tokens = inp, output_tokens = outp,
      reason = refusal.reason, cost_nanos = cost})
    refusal.agent = p.agent
    refusal.requested, refusal.available = N(refusal.requested), N(refusal.available)
    error(refusal)
  end
  return a, outp, loans
end

function V.reserve()
  sweep()
  local run = enter_call()
  local a, outp, loans = admit(false)
  local inp = p.input
  local amount = inp + outp
  a.reserved = a.reserved + amount
  a.reserved_in = a.reserved_in + inp
  a.reserved_out = a.reserved_out + outp
  local cost = p.cost or 0
  a.cost_reserved = a.cost_reserved + cost
  write(a)
  local keys = hold_limits(amount, cost)
  local rid = p.id
  local expires = now + p.lease
  put(rid, {s = 'open', a = p.agent, i = inp, o = outp, e = expires,
    q = redis.call('INCR', P .. 'seq'), l = loans, c = cost, k = keys, t = team}, nil)
  later('ZADD', P .. 'leases', N(expires), rid)
  if run and expires + run.forget > run.u then run.u = expires + run.forget end
  if #loans > 0 then
    local borrowed = 0
    for _, l in ipairs(loans) do borrowed = borrowed + l[2] end
    ev('transfer', p.agent, {tokens = borrowed, reservation_id = rid, donors = loans, reason = 'borrow'})
  end
  ev('reserve', p.agent, {tokens = amount, input_tokens = inp, output_tokens = outp,
    reservation_id = rid, donors = loans, cost_nanos = cost, limits = keys})
  result = {id = rid, input = N(inp), output = N(outp), expires = N(expires),
    loans = pairs_out(loans), cost = N(cost), limits = keys, team = team}
end

function V.check()
  sweep()
  enter_call()
  admit(true)
end

local function open(rid)
  local r = find(rid)
  if r == nil then error({type = 'settled', known = false, id = rid}) end
  if r.s == 'settled' then error({type = 'settled', known = true, id = rid, agent = r.a}) end
  return r
end
local function settle(rid, r)
  if r.s == 'open' then later('ZREM', P .. 'leases', rid) end
  r.s = 'settled'
  put(rid, r, SETTLED_TTL)
end

function V.commit()
  sweep()
  local rid = p.id
  local r = open(rid)
  local state = r.s
  local forgotten = (r.t ~= '' or team ~= '') and not resume(r.t, true)
  local ui, uo, cost = p.ui, p.uo, p.cost
  if ui == nil then ui, uo, cost, p.estimated = r.i, r.o, r.c, true end  -- settle what was held
  if cost == nil then cost = r.c end
  local used = ui + uo
  if forgotten then
    -- the run's team was forgotten meanwhile (_commit_forgotten): the limits record it
    settle(rid, r)
    ev('commit', r.a, {tokens = used, input_tokens = ui, output_tokens = uo,
      reservation_id = rid, donors = r.l, reason = 'forgotten', estimated = p.estimated,
      cost_nanos = cost})
    if #r.k > 0 then
      if state == 'expired' then
        spend_limits(r.k, r.a, used, cost, nil, nil)
      else
        spend_limits(r.k, r.a, used, cost, r.i + r.o, r.c)
      end
    end
    result = 0
    return
  end
  local a = need(r.a)
  check_total(r.a, 'consumed', a.consumed + used)
  check_total(r.a, 'cost (nano-dollars)', a.cost + cost)
  settle(rid, r)
  a.consumed = a.consumed + used
  a.consumed_in = a.consumed_in + ui
  a.consumed_out = a.consumed_out + uo
  a.cost = a.cost + cost
  write(a)
  local late = state == 'expired'
  local reason = ''
  if late then reason = 'late' end
  ev('commit', r.a, {tokens = used, input_tokens = ui, output_tokens = uo, reservation_id = rid,
    donors = r.l, reason = reason, estimated = p.estimated, cost_nanos = cost, limits = r.k})
  if not late then a.cost_reserved = a.cost_reserved - r.c end
  if #r.k > 0 then
    if late then
      spend_limits(r.k, r.a, used, cost, nil, nil)
    else
      spend_limits(r.k, r.a, used, cost, r.i + r.o, r.c)
    end
  end
  cap_overdrafts(a, rid, ui, uo, cost)
  if late then result = settle_overdraft(a, rid); warn_agent(a); return end
  local amount = r.i + r.o
  a.reserved = a.reserved - amount
  a.reserved_in = a.reserved_in - r.i
  a.reserved_out = a.reserved_out - r.o
  if used > amount then result = settle_overdraft(a, rid); warn_agent(a); return end
  local unused = amount - used
  for i = #r.l, 1, -1 do
    if unused <= 0 then break end
    local back = math.min(r.l[i][2], unused)
    local d = need(r.l[i][1])
    repay(a, d, back)
    write(d)
    unused = unused - back
    ev('transfer', d.name, {tokens = back, reservation_id = rid, donors = {{a.name, back}}, reason = 'return'})
  end
  warn_agent(a)
  result = 0
end

function V.release()
  sweep()
  local rid = p.id
  local r = open(rid)
  local state = r.s
  settle(rid, r)
  if state == 'expired' then return end
  unhold(r, true)
  ev('release', r.a, {tokens = r.i + r.o, input_tokens = r.i, output_tokens = r.o,
    reservation_id = rid, donors = r.l, cost_nanos = r.c})
end

function V.charge()
  sweep()
  enter_call()
  local a = need(p.agent)
  local used = p.ui + p.uo
  local cost = p.cost or 0
  check_total(p.agent, 'consumed', a.consumed + used)
  check_total(p.agent, 'cost (nano-dollars)', a.cost + cost)
  a.consumed = a.consumed + used
  a.consumed_in = a.consumed_in + p.ui
  a.consumed_out = a.consumed_out + p.uo
  a.cost = a.cost + cost
  write(a)
  local keys = {}
  for i, h in ipairs(p.holds or {}) do keys[i] = h[1] end
  ev('commit', p.agent, {tokens = used, input_tokens = p.ui, output_tokens = p.uo,
    reason = 'direct', estimated = p.estimated, cost_nanos = cost, limits = keys})
  if p.holds and #p.holds > 0 then
    spend_limits(hold_limits(0, 0), p.agent, used, cost, nil, nil)
  end
  cap_overdrafts(a, nil, p.ui, p.uo, cost)
  result = settle_overdraft(a, nil)
  warn_agent(a)
end

function V.reallocate()
  sweep()
  enter_call()
  local a = need(p.agent)
  if p.tokens <= 0 or a.max_tokens == nil then result = 0; return end
  local plan, found = borrow(a, p.tokens)
  apply(a, plan)
  if #plan > 0 then
    rearm(a)
    ev('transfer', p.agent, {tokens = found, donors = loans_of(plan), reason = 'reallocate'})
  end
  result = found
end

function V.adjust()
  sweep()
  enter_call()
  local a = need(p.agent)
  if a.max_tokens == nil then
    error({type = 'contract', message = "Agent '" .. p.agent .. "' is budgeted in money only " ..
      '(no max_tokens): a token grant has nothing to change; nothing was changed'})
  end
  local av = available(a)
  if p.delta < 0 and -p.delta > av then
    error({type = 'budget', agent = p.agent, requested = N(-p.delta),
      available = N(math.max(av, 0)), reason = 'revocation'})
  end
  local total = 0
  if team ~= '' then  -- a run's team: its allocation in all is its rows'
    for _, r in ipairs(all_rows()) do total = total + r.allocated end
  else
    total = tonumber(redis.call('GET', P .. 'total') or '0')
  end
  check_total(p.agent, "the namespace's allocation", total + p.delta)
  if team == '' then later('SET', P .. 'total', N(total + p.delta)) end
  a.allocated = a.allocated + p.delta
  write(a)
  if p.delta > 0 then rearm(a) end
  ev('transfer', p.agent, {tokens = p.delta, reason = 'grant'})
end

function V.complete()
  sweep()
  enter_call()
  local a = need(p.agent)
  if a.complete == 1 then return end
  a.complete = 1
  write(a)
  ev('complete', p.agent, {tokens = math.max(available(a), 0)})
end

function V.confidence()
  sweep()
  enter_call()
  local a = need(p.agent)
  local before = gated(a)
  a.last_confidence = p.value
  local after = gated(a)
  write(a)
  ev('confidence', p.agent, {confidence = N(p.value)})
  if before ~= after then
    local reason = 'opened'
    if after then reason = 'closed' end
    ev('gate', p.agent, {reason = reason, confidence = N(p.value), threshold = N(a.threshold)})
  end
  result = after
end

function V.threshold()
  sweep()
  enter_call()
  local a = need(p.agent)
  local before = gated(a)
  a.threshold = p.value
  local after = gated(a)
  write(a)
  local reason = 'threshold'
  if before ~= after then
    reason = 'opened'
    if after then reason = 'closed' end
  end
  ev('gate', p.agent, {reason = reason, confidence = N(a.last_confidence), threshold = N(p.value)})
end

function V.expire()
  result = sweep()
end

-- reads
function V.status()
  local out = {}
  for i, a in ipairs(all_rows()) do
    local h = {name = a.name, contract = redis.call('GET', P .. 'con:' .. a.name)}
    for _, f in ipairs(FIELDS) do h[f] = N(a[f]) end
    out[i] = h
  end
  result = out
end
local function limit_out(x)
  local spent = {}
  for name, s in pairs(x.agents) do table.insert(spent, {name, N(s[1]), N(s[2]), N(s[3])}) end
  local b = nil
  if x.buckets then
    b = {}
    for t, v in pairs(x.buckets) do table.insert(b, {N(t), N(v[1]), N(v[2])}) end
  end
  return {key = x.key, max_tokens = N(x.max_tokens), max_cost = N(x.max_cost),
    warn_tokens = N(x.warn_tokens), warn_cost = N(x.warn_cost), ends = N(x.ends),
    consumed = N(x.consumed), reserved = N(x.reserved), cost = N(x.cost),
    cost_reserved = N(x.cost_reserved), warned = x.warned, agents = spent,
    rolling = x.buckets ~= nil, buckets = b}
end
-- a run's team as it stands (team_rows): fresh rows for agents it has not used
function V.team()
  local rec = enter(p.team)
  local alive = rec and rec.u > now
  local out = {}
  for i, name in ipairs(redis.call('ZRANGE', P .. 'agents', 0, -1)) do
    local a = nil
    if alive then a = agent(name) end
    if not a then a = new_row(name) end
    local h = {name = name, contract = redis.call('GET', P .. 'con:' .. name)}
    for _, f in ipairs(FIELDS) do h[f] = N(a[f]) end
    out[i] = h
  end
  enter('')
  result = out
end
function V.limit()
  local x = limit_row(p.id)
  if not x then result = false; return end
  result = limit_out(x)
end
-- every limit row kept whose key starts with the prefix (in p.id)
function V.limits()
  local out = {}
  for _, key in ipairs(redis.call('ZRANGE', P .. 'limits', 0, -1)) do
    if string.sub(key, 1, #p.id) == p.id then
      local x = limit_row(key)
      if x then table.insert(out, limit_out(x)) end
    end
  end
  result = out
end
function V.contracts()
  local out = {}
  for i, name in ipairs(redis.call('ZRANGE', P .. 'agents', 0, -1)) do
    out[i] = {name = name, contract = redis.call('GET', P .. 'con:' .. name)}
  end
  result = out
end
function V.open()
  local out = {}
  for i, rid in ipairs(redis.call('ZRANGE', P .. 'leases', 0, -1)) do
    local r = find(rid)
    out[i] = {id = rid, agent = r.a, input = N(r.i), output = N(r.o), expires = N(r.e),
      seq = N(r.q), loans = pairs_out(r.l), cost = N(r.c), limits = r.k, team = r.t}
  end
  result = out
end

-- ARGV: verb, agent, reservation id, extra JSON (the contract to register), the namespace's
-- epoch, a comma-terminated list: now, events wanted ('1'/'0'), then the verb's fields
-- below in order, '' for none (the store's _FIELDS must list the same), and the run key
-- of the call's team ('' for the namespace's own).
local CSV = {
  register = {'max_cost'},
  reserve = {'input', 'output', 'lease', 'clamp', 'policy', 'alpha', 'first', 'lift', 'kappa',
    'cost', 'forget'},
  check = {'input', 'output', 'lease', 'clamp', 'policy', 'alpha', 'first', 'lift', 'kappa',
    'cost', 'forget'},
  commit = {'ui', 'uo', 'estimated', 'policy', 'alpha', 'first', 'lift', 'kappa', 'cost'},
  release = {},
  charge = {'ui', 'uo', 'estimated', 'policy', 'alpha', 'first', 'lift', 'kappa', 'cost',
    'forget'},
  reallocate = {'tokens', 'policy', 'alpha', 'first', 'lift', 'kappa', 'forget'},
  adjust = {'delta', 'forget'},
  complete = {'forget'},
  confidence = {'value', 'forget'},
  threshold = {'value', 'forget'},
  expire = {}, status = {}, contracts = {}, open = {}, limit = {}, limits = {}, team = {},
}
local FLAG = {clamp = true, estimated = true}

local function run(keys, argv)
  P = keys[1]
  ns = string.sub(P, 6, -3)
  verb = argv[1]
  local fields = CSV[verb]
  if not fields then error('tbc: unknown verb ' .. tostring(verb)) end
  if redis.call('GET', P .. 'epoch') ~= argv[5] then
    return cjson.encode({e = {type = 'lost'}, v = {}})
  end
  p = {agent = argv[2], id = argv[3]}
  if argv[7] ~= nil and argv[7] ~= '' then p.team = argv[7] end
  if verb == 'register' then
    p.contract_json, p.contract = argv[4], cjson.decode(argv[4])
  elseif argv[4] ~= '' then
    p.holds = cjson.decode(argv[4])  -- the limits of the call's scope (LimitHold tuples)
  end
  local i = -1
  for v in string.gmatch(argv[6], '([^,]*),') do
    if i == -1 then
      now = tonumber(v)
    elseif i == 0 then
      p.ev = v == '1'
    elseif v ~= '' then
      local f = fields[i]
      if FLAG[f] then p[f] = v == '1' elseif f == 'policy' then p[f] = v else p[f] = tonumber(v) end
    end
    i = i + 1
  end
  events, recs, recdirty, calls, lims, limdirty = {}, {}, {}, {}, {}, {}
  team, tcache, trecs, trdirty = '', {[''] = {rows = {}, dirty = {}}}, {}, {}
  rows, dirty = tcache[''].rows, tcache[''].dirty
  result, err = nil, nil
  local ok, e = pcall(V[verb])
  if not ok then
    if type(e) ~= 'table' then error(e) end  -- a defect: nothing was written
    err = e
  end
  -- a verb that fails decided so before changing anything but the sweep and a refusal's
  -- count (as in _engine.py), which are kept
  save()
  return cjson.encode({r = result, e = err, v = events})
end

-- Loaded with FUNCTION LOAD (Redis 7+), this registers the function the store calls with
-- FCALL; run with EVALSHA (older servers), it handles the call directly.
if redis.register_function then
  redis.register_function('TBC_FUNCTION', run)
else
  return run(KEYS, ARGV)
end
