-- tbc-integrations: every ledger verb as one atomic server-side script.
-- ARGV: namespace, verb, now, events wanted ('1' or '0'), then the verb's arguments in
-- the order ARGS gives ('' for none). All keys share the hash tag {namespace}, so a
-- namespace lives in one Redis Cluster slot. Returns JSON:
-- {"result": ..., "error": {...} or absent, "events": [...]}.
-- Per-call state: set at the start of every call (Redis runs one call at a time), so the
-- functions below are built once when the library is loaded, not on every call.
local ns, verb, now, p, P
local events, cache, dirty
local result, err
-- An agent's numbers live in one string of packed doubles (one GET and one SET per
-- verb instead of a hash of 18 fields); its contract stays in the hash agent:<name>.
-- Optional numbers (caps, threshold, last confidence; never negative) are stored as -1.
local FIELDS = {'priority','min_reserve','allocated','consumed','consumed_in','consumed_out',
  'reserved','reserved_in','reserved_out','borrowed','lent','refusals','complete',
  'max_input','max_output','threshold','last_confidence','max_tokens','ix','ixv'}
local NF = #FIELDS
local FMT = 'dddddddddddddddddddd'  -- NF doubles
local OPTIONAL = {max_input = true, max_output = true, threshold = true, last_confidence = true}

local function str(v)
  -- redis.call takes strings: JSON null and nil become '', numbers keep every digit
  if v == nil or v == cjson.null then return '' end
  if type(v) == 'number' then return string.format('%.17g', v) end
  if type(v) == 'boolean' then return v and '1' or '0' end
  return tostring(v)
end
local function opt(v) if v == cjson.null then return nil end return v end

local function load(name)
  local a = cache[name]
  if a then return a end
  local raw = redis.call('GET', P .. 'num:' .. name)
  if not raw then return nil end
  local v = {struct.unpack(FMT, raw)}
  a = {name = name}
  for i = 1, NF do
    local f, x = FIELDS[i], v[i]
    if x < 0 and OPTIONAL[f] then x = nil end
    a[f] = x
  end
  a.was_complete = a.complete
  cache[name] = a
  return a
end
local function need_agent(name)
  local a = load(name)
  if not a then error({unknown = name}) end
  return a
end
local function avail(a) return a.allocated - a.consumed - a.reserved end
local function spare(a) if a.complete == 1 then return avail(a) end return avail(a) - a.min_reserve end
local function touch(a) dirty[a.name] = a end
local function gated(a) return a.threshold ~= nil and a.last_confidence ~= nil and a.last_confidence >= a.threshold end
local function ev(kind, agent, t)
  if not p.ev then return end  -- nobody listens: build no events
  t = t or {}
  t.kind, t.agent, t.time, t.namespace = kind, agent, now, ns
  t.tokens = t.tokens or 0
  t.input_tokens = t.input_tokens or 0
  t.output_tokens = t.output_tokens or 0
  t.reason = t.reason or ''
  if t.estimated == nil then t.estimated = false end
  table.insert(events, t)
end
-- The donor index is lazy: each priority level (and the completed agents) is a sorted set
-- scored by -remaining, where an agent's score may overstate what it has left (ix: indexed,
-- ixv: the remaining it was indexed at) but never understates it. Spending lowers
-- remaining and leaves the index alone; only a rise above the indexed value re-scores.
-- The planner corrects overstated entries as it meets them, so donors still come out
-- exactly in order.
local function donor_key(a)
  if a.complete == 1 then return P .. 'don:done' end
  return P .. 'don:p' .. a.priority
end
local function reindex(a)
  if a.complete ~= a.was_complete then  -- completion moves it to the completed set
    redis.call('ZREM', P .. 'don:p' .. a.priority, a.name)
    a.ix, a.was_complete = 0, a.complete
  end
  local av = avail(a)
  if spare(a) > 0 and (a.ix ~= 1 or av > a.ixv) then
    redis.call('ZADD', donor_key(a), str(-av), a.name)
    a.ix, a.ixv = 1, av
  end
end
local function save()
  for name, a in pairs(dirty) do
    reindex(a)
    local v = {}
    for i = 1, NF do
      local x = a[FIELDS[i]]
      if x == nil then x = -1 end
      v[i] = x
    end
    redis.call('SET', P .. 'num:' .. name, struct.pack(FMT, unpack(v)))
  end
  dirty = {}
end
local function protected(a)
  if a.consumed ~= 0 or a.reserved ~= 0 then return false end
  for _, dep in ipairs(redis.call('SMEMBERS', P .. 'dependents:' .. a.name)) do
    local d = load(dep)
    if d and d.complete ~= 1 then return true end
  end
  return false
end

-- donors in the design's order: completed first, then lowest priority, then most remaining
local function plan(needy, need, partial)
  local bound = need
  if p.policy == 'weighted' then
    local top = redis.call('ZRANGE', P .. 'levels', -1, -1)
    local maxp = tonumber(top[1] or needy.priority)
    if needy.priority > maxp then maxp = needy.priority end
    local deficit = 1.0
    if needy.threshold ~= nil then
      deficit = needy.threshold - (needy.last_confidence or 0.0)
      if deficit < 0 then deficit = 0 end
    end
    local imax = needy.max_input or needy.max_tokens
    local b = math.ceil(p.alpha * (needy.priority / maxp) * deficit * imax - 1e-9)
    if b < bound then bound = b end
  end
  local out, found = {}, 0
  if bound <= 0 then return out, found end
  local keys = {P .. 'don:done'}
  for _, lv in ipairs(redis.call('ZRANGEBYSCORE', P .. 'levels', '-inf', str(needy.priority))) do
    table.insert(keys, P .. 'don:p' .. lv)
  end
  for _, a in pairs(dirty) do reindex(a) end  -- what this call gave back is visible
  for _, key in ipairs(keys) do
    local start = 0
    while found < bound do
      local rows = redis.call('ZRANGE', key, start, start + 15, 'WITHSCORES')
      if #rows == 0 then break end
      for i = 1, #rows, 2 do
        local name = rows[i]
        start = start + 1
        if name ~= needy.name then
          local d = load(name)
          local av, s = avail(d), spare(d)
          if av ~= -tonumber(rows[i + 1]) then
            -- an overstated entry: move it to its true place (or out) and read on from here
            if s > 0 then
              redis.call('ZADD', key, str(-av), name)
              d.ixv = av
            else
              redis.call('ZREM', key, name)
              d.ix = 0
            end
            touch(d)
            start = start - 1
            break
          end
          if s > 0 and (d.complete == 1 or not protected(d)) then
            local take = math.min(s, bound - found)
            table.insert(out, {d, take})
            found = found + take
            if found >= bound then break end
          end
        end
      end
    end
    if found >= bound then break end
  end
  return out, found
end
local function apply(needy, pl)
  for _, pair in ipairs(pl) do
    local d, t = pair[1], pair[2]
    d.allocated = d.allocated - t; d.lent = d.lent + t
    needy.allocated = needy.allocated + t; needy.borrowed = needy.borrowed + t
    touch(d)
  end
  touch(needy)
end
local function pairs_of(pl) local o = {} for _, x in ipairs(pl) do table.insert(o, {x[1].name, x[2]}) end return o end

local function unhold(agent, inp, outp, loans)
  local a = need_agent(agent)
  a.reserved = a.reserved - inp - outp; a.reserved_in = a.reserved_in - inp; a.reserved_out = a.reserved_out - outp
  for _, l in ipairs(loans) do
    local d = need_agent(l[1])
    a.allocated = a.allocated - l[2]; a.borrowed = a.borrowed - l[2]
    d.allocated = d.allocated + l[2]; d.lent = d.lent - l[2]
    touch(d)
  end
  touch(a)
end
-- An open reservation is one member of the sorted set leases, scored by its expiry: the
-- member itself holds what it reserved (JSON of strings, so the same reservation always
-- encodes the same way), and a settle names it again to remove it. A settled id is
-- remembered under res:<id> for SETTLED_TTL so a retried settle is refused, and an
-- expired one keeps its record there so a late commit is still counted.
local SETTLED_TTL = 3600   -- SETTLED_MEMORY_SECONDS of the stores (a test checks they agree)
local EXPIRED_TTL = 86400  -- EXPIRED_MEMORY_SECONDS
local function member(rid, agent, inp, outp, loans)
  local m = rid .. '|' .. str(inp) .. '|' .. str(outp) .. '|' .. #agent .. '|' .. agent
  if #loans == 0 then return m end
  local ls = {}
  for i, l in ipairs(loans) do ls[i] = {tostring(l[1]), str(l[2])} end
  return m .. cjson.encode(ls)
end
local function unmember(m)
  local rid, inp, outp, n, at = string.match(m, '^([^|]*)|([^|]*)|([^|]*)|(%d+)|()')
  n = tonumber(n)
  local agent, rest = string.sub(m, at, at + n - 1), string.sub(m, at + n)
  local loans = {}
  if rest ~= '' then
    for i, l in ipairs(cjson.decode(rest)) do loans[i] = {l[1], tonumber(l[2])} end
  end
  return rid, agent, tonumber(inp), tonumber(outp), loans
end
local function sweep()
  local due = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', str(now))
  for _, m in ipairs(due) do
    redis.call('ZREM', P .. 'leases', m)
    local rid, agent, inp, outp, loans = unmember(m)
    unhold(agent, inp, outp, loans)
    redis.call('SET', P .. 'res:' .. rid, cjson.encode({state = 'expired', agent = agent,
      input = inp, output = outp, loans = loans}), 'EX', EXPIRED_TTL)
    ev('expire', agent, {tokens = inp + outp, input_tokens = inp, output_tokens = outp,
      reservation_id = rid, donors = loans, reason = 'lease'})
  end
  return #due
end
local function settle_overdraft(a, rid)
  local short = -avail(a)
  if short <= 0 then return 0 end
  local pl, found = plan(a, short, true)
  apply(a, pl)
  if #pl > 0 then ev('transfer', a.name, {tokens = found, reservation_id = rid, donors = pairs_of(pl), reason = 'overdraft'}) end
  local left = short - found
  if left > 0 then ev('overdraft', a.name, {tokens = left, reservation_id = rid}) end
  return left
end

local function dispatch()
  if verb == 'register' then
    local c = p.contract
    local key = P .. 'agent:' .. c.agent_name
    local existing = redis.call('HGET', key, 'contract')
    if existing then
      result = {created = false, contract = existing}
      return
    end
    redis.call('HSET', key, 'contract', p.contract_json)
    local order = redis.call('INCR', P .. 'seq')
    redis.call('ZADD', P .. 'agents', order, c.agent_name)
    redis.call('ZADD', P .. 'levels', str(c.priority), str(c.priority))
    for _, dep in ipairs(c.depends_on or {}) do redis.call('SADD', P .. 'dependents:' .. dep, c.agent_name) end
    local a = {name = c.agent_name, priority = c.priority, min_reserve = c.min_reserve,
      allocated = c.max_tokens, consumed = 0, consumed_in = 0, consumed_out = 0, reserved = 0,
      reserved_in = 0, reserved_out = 0, borrowed = 0, lent = 0, refusals = 0, complete = 0,
      max_input = opt(c.max_input_tokens), max_output = opt(c.max_output_tokens),
      threshold = opt(c.confidence_threshold), last_confidence = nil, max_tokens = c.max_tokens,
      ix = 0, ixv = 0, was_complete = 0}
    cache[c.agent_name] = a
    touch(a)
    ev('register', c.agent_name, {tokens = c.max_tokens, contract = c})
    result = {created = true}
    return
  end
  if verb == 'status' or verb == 'contracts' or verb == 'open' then
    local names = redis.call('ZRANGE', P .. 'agents', 0, -1)
    local rows = {}
    if verb == 'open' then
      local all = redis.call('ZRANGE', P .. 'leases', 0, -1, 'WITHSCORES')
      for i = 1, #all, 2 do
        local rid, agent, inp, outp, loans = unmember(all[i])
        table.insert(rows, {id = rid, agent = agent, input = str(inp), output = str(outp),
          expires = all[i + 1], loans = loans})
      end
    else
      for _, name in ipairs(names) do
        local h = {name = name, contract = redis.call('HGET', P .. 'agent:' .. name, 'contract')}
        if verb == 'status' then
          local a = load(name)
          for i = 1, NF do h[FIELDS[i]] = str(a[FIELDS[i]]) end
        end
        table.insert(rows, h)
      end
    end
    result = rows
    return
  end
  if verb == 'expire' then result = sweep(); save(); return end
  sweep()
  if verb == 'reserve' or verb == 'check' then
    local a = need_agent(p.agent)
    local inp, outp = p.input, p.output
    if p.clamp and a.max_output ~= nil then
      local left = a.max_output - a.consumed_out - a.reserved_out
      if left > 0 and left < outp then outp = left end
    end
    local amount = inp + outp
    local av = avail(a)
    local refusal = nil
    if gated(a) then
      refusal = {type = 'gate', requested = amount, available = math.max(av, 0), confidence = a.last_confidence, threshold = a.threshold, reason = 'confidence gate'}
    elseif a.max_input ~= nil and a.consumed_in + a.reserved_in + inp > a.max_input then
      refusal = {type = 'budget', requested = inp, available = math.max(a.max_input - a.consumed_in - a.reserved_in, 0), reason = 'input cap'}
    elseif a.max_output ~= nil and a.consumed_out + a.reserved_out + outp > a.max_output then
      refusal = {type = 'budget', requested = outp, available = math.max(a.max_output - a.consumed_out - a.reserved_out, 0), reason = 'output cap'}
    end
    local loans = {}
    if refusal == nil and amount > av then
      local need = amount - av
      local pl, found = plan(a, need, false)
      if found < need then
        refusal = {type = 'budget', requested = amount, available = math.max(av, 0) + found, reason = 'budget'}
      elseif verb == 'reserve' then
        apply(a, pl)
        loans = pairs_of(pl)
      end
    end
    if refusal ~= nil then
      a.refusals = a.refusals + 1
      touch(a)
      ev('refuse', p.agent, {tokens = amount, input_tokens = inp, output_tokens = outp, reason = refusal.reason})
      err = refusal
      err.agent = p.agent
      return
    end
    if verb == 'check' then return end
    a.reserved = a.reserved + amount; a.reserved_in = a.reserved_in + inp; a.reserved_out = a.reserved_out + outp
    touch(a)
    local rid = p.id
    local expires = now + p.lease
    redis.call('ZADD', P .. 'leases', str(expires), member(rid, p.agent, inp, outp, loans))
    if #loans > 0 then
      local total = 0
      for _, l in ipairs(loans) do total = total + l[2] end
      ev('transfer', p.agent, {tokens = total, reservation_id = rid, donors = loans, reason = 'borrow'})
    end
    ev('reserve', p.agent, {tokens = amount, input_tokens = inp, output_tokens = outp, reservation_id = rid, donors = loans})
    -- numbers as strings: every digit reaches the client, which names them again to settle
    local ls = {}
    for i, l in ipairs(loans) do ls[i] = {l[1], str(l[2])} end
    result = {id = rid, input = str(inp), output = str(outp), expires = str(expires), loans = ls}
    return
  end
  if verb == 'commit' or verb == 'release' then
    local h
    local m = member(p.id, p.agent, p.input, p.output, p.loans)
    if redis.call('ZREM', P .. 'leases', m) == 1 then
      h = {state = 'open', agent = p.agent, input = p.input, output = p.output, loans = p.loans}
    else
      local raw = redis.call('GET', P .. 'res:' .. p.id)
      h = raw and cjson.decode(raw) or {}
      if h.state ~= 'expired' then
        err = {type = 'settled', known = h.state ~= nil}
        return
      end
    end
    redis.call('SET', P .. 'res:' .. p.id, '{"state":"settled"}', 'EX', SETTLED_TTL)
    local inp, outp, loans = h.input, h.output, h.loans
    if verb == 'release' then
      if h.state == 'open' then
        unhold(h.agent, inp, outp, loans)
        ev('release', h.agent, {tokens = inp + outp, input_tokens = inp, output_tokens = outp, reservation_id = p.id, donors = loans})
      end
      return
    end
    local a = need_agent(h.agent)
    local ui, uo = p.ui, p.uo
    local used = ui + uo
    if h.state == 'expired' then
      a.consumed = a.consumed + used; a.consumed_in = a.consumed_in + ui; a.consumed_out = a.consumed_out + uo
      touch(a)
      ev('commit', h.agent, {tokens = used, input_tokens = ui, output_tokens = uo, reservation_id = p.id, donors = loans, reason = 'late', estimated = p.estimated})
      result = settle_overdraft(a, p.id)
      return
    end
    local amount = inp + outp
    a.reserved = a.reserved - amount; a.reserved_in = a.reserved_in - inp; a.reserved_out = a.reserved_out - outp
    a.consumed = a.consumed + used; a.consumed_in = a.consumed_in + ui; a.consumed_out = a.consumed_out + uo
    touch(a)
    ev('commit', h.agent, {tokens = used, input_tokens = ui, output_tokens = uo, reservation_id = p.id, donors = loans, estimated = p.estimated})
    if used <= amount then
      local unused = amount - used
      for i = #loans, 1, -1 do
        if unused <= 0 then break end
        local back = math.min(loans[i][2], unused)
        local d = need_agent(loans[i][1])
        a.allocated = a.allocated - back; a.borrowed = a.borrowed - back
        d.allocated = d.allocated + back; d.lent = d.lent - back
        unused = unused - back
        touch(d)
        ev('transfer', d.name, {tokens = back, reservation_id = p.id, donors = {{a.name, back}}, reason = 'return'})
      end
      result = 0
      return
    end
    result = settle_overdraft(a, p.id)
    return
  end
  if verb == 'charge' then
    local a = need_agent(p.agent)
    local used = p.ui + p.uo
    a.consumed = a.consumed + used; a.consumed_in = a.consumed_in + p.ui; a.consumed_out = a.consumed_out + p.uo
    touch(a)
    ev('commit', p.agent, {tokens = used, input_tokens = p.ui, output_tokens = p.uo, reason = 'direct', estimated = p.estimated})
    result = settle_overdraft(a, nil)
    return
  end
  if verb == 'reallocate' then
    local a = need_agent(p.agent)
    if p.tokens <= 0 then result = 0 return end
    local pl, found = plan(a, p.tokens, true)
    apply(a, pl)
    if #pl > 0 then ev('transfer', p.agent, {tokens = found, donors = pairs_of(pl), reason = 'reallocate'}) end
    result = found
    return
  end
  if verb == 'adjust' then
    local a = need_agent(p.agent)
    if p.delta < 0 and -p.delta > avail(a) then
      err = {type = 'budget', agent = p.agent, requested = -p.delta, available = math.max(avail(a), 0), reason = 'revocation'}
      return
    end
    a.allocated = a.allocated + p.delta
    touch(a)
    ev('transfer', p.agent, {tokens = p.delta, reason = 'grant'})
    return
  end
  if verb == 'complete' then
    local a = need_agent(p.agent)
    if a.complete == 1 then return end
    a.complete = 1
    touch(a)
    ev('complete', p.agent, {tokens = math.max(avail(a), 0)})
    return
  end
  if verb == 'confidence' or verb == 'threshold' then
    local a = need_agent(p.agent)
    local before = gated(a)
    if verb == 'confidence' then a.last_confidence = opt(p.value) else a.threshold = opt(p.value) end
    local after = gated(a)
    touch(a)
    if verb == 'confidence' then
      ev('confidence', p.agent, {confidence = p.value})
      if before ~= after then
        ev('gate', p.agent, {reason = after and 'closed' or 'opened', confidence = p.value, threshold = a.threshold})
      end
    else
      local reason = 'threshold'
      if before ~= after then reason = after and 'closed' or 'opened' end
      ev('gate', p.agent, {reason = reason, confidence = a.last_confidence, threshold = p.value})
    end
    result = after
    return
  end
  error({unknown_verb = verb})
end

-- Arguments: KEYS[1] is the namespace's prefix 'tbc:{<namespace>}:'. ARGV is verb, agent,
-- reservation id, extra JSON (the contract to register, or a reservation's loans) and a
-- comma-terminated list: now, events wanted ('1'/'0'), then the verb's fields below in
-- order, '' for none. (The store's _FIELDS must list the same.)
local CSV = {
  register = {},
  reserve = {'input', 'output', 'lease', 'clamp', 'policy', 'alpha'},
  check = {'input', 'output', 'lease', 'clamp', 'policy', 'alpha'},
  commit = {'input', 'output', 'ui', 'uo', 'estimated', 'policy', 'alpha'},
  release = {'input', 'output'},
  charge = {'ui', 'uo', 'estimated', 'policy', 'alpha'},
  reallocate = {'tokens', 'policy', 'alpha'},
  adjust = {'delta'},
  complete = {},
  confidence = {'value'},
  threshold = {'value'},
  expire = {}, status = {}, contracts = {}, open = {},
}
local FLAG = {clamp = true, estimated = true}

local function run(keys, argv)
  P = keys[1]
  ns = string.sub(P, 6, -3)
  verb = argv[1]
  local fields = CSV[verb]
  if not fields then error('tbc: unknown verb ' .. tostring(verb)) end
  p = {loans = {}}
  if argv[2] ~= '' then p.agent = argv[2] end
  if argv[3] ~= '' then p.id = argv[3] end
  if argv[4] ~= '' then
    if verb == 'register' then
      p.contract_json, p.contract = argv[4], cjson.decode(argv[4])
    else
      p.loans = cjson.decode(argv[4])
    end
  end
  local i = -1
  for v in string.gmatch(argv[5], '([^,]*),') do
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
  events, cache, dirty = {}, {}, {}
  result, err = nil, nil
  local ok, e = pcall(dispatch)
  if not ok then
    if type(e) == 'table' and e.unknown then
      save()  -- leases swept before the error still count
      return cjson.encode({error = {type = 'unknown', agent = e.unknown}, events = events})
    end
    error(e)
  end
  save()
  return cjson.encode({result = result, error = err, events = events})
end

-- Loaded with FUNCTION LOAD (Redis 7+), this registers the function the store calls with
-- FCALL; run with EVALSHA (older servers), it handles the call directly.
if redis.register_function then
  redis.register_function('TBC_FUNCTION', run)
else
  return run(KEYS, ARGV)
end
